"""What full_reuse and cacheblend share: a request's chunks placed and their stored KV read, with the rows every plan
of theirs computes (the uncached rows, forced chunk heads, the last row), all counted on the host."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..chunk_reads import RequestChunks
from ..chunk_source import kv_rows
from ..plan import CachedSpan, PlanReport
from ..segments import TokenRun
from ..transfer import upload


@dataclass(frozen=True, eq=False)
class ReusedChunks:
    """ids: [N] token ids; spans: the reused chunks' rows; forced: [N] bool, the rows every plan computes through
    every layer (the uncached rows, the first ``head`` rows of every chunk, the last row); forced_rows: [F] those
    rows, sorted; n_forced: (forced rows, forced rows that are cached), counted on the host; report: the hits,
    misses, unplaced chunks and read time so far."""

    ids: torch.Tensor
    spans: tuple[CachedSpan, ...]
    forced: torch.Tensor
    forced_rows: torch.Tensor
    n_forced: tuple[int, int]
    report: PlanReport

    @property
    def n_cached(self) -> int:
        return sum(span.kv.n_tokens for span in self.spans)


def reuse_chunks(
    runs: list[TokenRun], chunks: RequestChunks, head: int, report: PlanReport, placement: tuple | None = None
) -> ReusedChunks:
    """Place ``runs``' chunks (or take ``placement``, what ``chunks.place(runs)`` returned), read their KV (a miss
    computed) and find the forced rows, ``head`` rows of each chunk among them; ``report`` is filled in with what
    happened."""
    runs, unplaced, fallback = placement if placement is not None else chunks.place(runs)
    device = chunks.fwd.device
    ids = upload(torch.tensor([t for r in runs for t in r.token_ids], dtype=torch.long), device)  # [N]
    n = ids.shape[0]
    t = time.perf_counter()
    cached = [r for r in runs if r.handle is not None]
    # chunks in a slow tier arrive layer by layer while the prefill runs (store/pipeline.py)
    kvs, hits, misses = chunks.fetch([r.handle for r in cached])
    spans = tuple(CachedSpan(r.start, kv_rows(kv, r.offset, len(r.token_ids))) for r, kv in zip(cached, kvs))
    load_s = time.perf_counter() - t
    # built on the host, so the counts the layer loop needs are known without reading the device
    forced = torch.ones(n, dtype=torch.bool)  # [N]: the rows a check layer must keep
    from_cache = torch.zeros(n, dtype=torch.bool)
    for span in spans:
        forced[span.start + head : span.end] = False
        from_cache[span.start : span.end] = True
    forced[n - 1] = True
    counts = (int(forced.sum()), int((forced & from_cache).sum()))
    forced_rows = upload(forced.nonzero().squeeze(1), device)  # [F] sorted
    report = replace(report, hits=hits, misses=misses, unplaced=unplaced, fallback=fallback, load_s=load_s)
    return ReusedChunks(ids, spans, upload(forced, device), forced_rows, counts, report)
