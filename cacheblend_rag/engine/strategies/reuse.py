"""What full_reuse and cacheblend share: a request's chunks placed and their stored KV read, with the rows every plan
of theirs computes (the uncached rows, forced chunk heads, the last row), all counted on the host.

The prompt's head (the rows before its first chunk: the system prompt and the instructions, the same in every
request of an app) sees only itself, so its K/V is exact wherever it is computed. The second request that computes
it stores it (a head seen once, such as one that holds the question, is never written), under a key of its tokens
(chained from the registry scope's root, as prefix_cache's keys are), and later requests read it like a chunk, but
as exact K/V: never a candidate for recomputation, never computed. A store that keeps less precision than the
model computes in (``int8``, or float16 under a float32 model) would make it inexact: the head is then computed in
every request."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ...store import KVStore, chain_key
from ...store.keys import scope_root
from ..chunk_reads import RequestChunks
from ..chunk_source import kv_rows
from ..plan import CachedSpan, PlanReport, PrefillPlan
from ..prefill import PrefillResult
from ..segments import TokenRun
from ..transfer import upload


@dataclass(frozen=True, eq=False)
class ReusedChunks:
    """ids: [N] token ids; spans: the reused chunks' rows; forced: [N] bool, the rows every plan computes through
    every layer (the uncached rows but a stored head, the first ``head`` rows of every chunk, the last row);
    forced_rows: [F] those rows, sorted; n_forced: (forced rows, forced rows that are cached), counted on the host;
    report: the hits, misses, unplaced chunks and read time so far, and the head's key when it is to be stored;
    exact: the prompt's head read from the store (rows 0..T-1, exact K/V), or nothing."""

    ids: torch.Tensor
    spans: tuple[CachedSpan, ...]
    forced: torch.Tensor
    forced_rows: torch.Tensor
    n_forced: tuple[int, int]
    report: PlanReport
    exact: tuple[CachedSpan, ...] = ()

    @property
    def computed_head(self) -> int:
        """Rows before the first chunk that a plan computes (none when the head was read from the store)."""
        return self.spans[0].start - self.report.exact if self.spans else 0

    @property
    def capture(self) -> tuple[int, int] | None:
        """The rows whose K/V the first pass over the model captures for ``store_head`` (the head, on a miss)."""
        return (0, self.spans[0].start) if self.report.head_key is not None else None

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
    tokens = [t for r in runs for t in r.token_ids]
    ids = upload(torch.tensor(tokens, dtype=torch.long), device)  # [N]
    n = ids.shape[0]
    t = time.perf_counter()
    cached = [r for r in runs if r.handle is not None]
    # chunks in a slow tier arrive layer by layer while the prefill runs (store/pipeline.py)
    kvs, hits, misses = chunks.fetch([r.handle for r in cached])
    spans = tuple(CachedSpan(r.start, kv_rows(kv, r.offset, len(r.token_ids))) for r, kv in zip(cached, kvs))
    exact, head_key = read_head(tokens[: spans[0].start] if spans else [], chunks)
    load_s = time.perf_counter() - t
    # built on the host, so the counts the layer loop needs are known without reading the device
    forced = torch.ones(n, dtype=torch.bool)  # [N]: the rows a check layer must keep
    from_cache = torch.zeros(n, dtype=torch.bool)
    for span in spans:
        forced[span.start + head : span.end] = False
        from_cache[span.start : span.end] = True
    for span in exact:
        forced[span.start : span.end] = False
    forced[n - 1] = True
    counts = (int(forced.sum()), int((forced & from_cache).sum()))
    forced_rows = upload(forced.nonzero().squeeze(1), device)  # [F] sorted
    exact_rows = sum(span.kv.n_tokens for span in exact)
    report = replace(
        report,
        hits=hits,
        misses=misses,
        unplaced=unplaced,
        fallback=fallback,
        load_s=load_s,
        head_key=head_key,
        exact=exact_rows,
    )
    return ReusedChunks(ids, spans, upload(forced, device), forced_rows, counts, report, exact)


def read_head(head: list[int], chunks: RequestChunks) -> tuple[tuple[CachedSpan, ...], str | None]:
    """The prompt's head, the token ids of the rows before the first chunk: (its stored K/V as an exact span, None)
    on a hit; on a miss ((), the key to store it under) if a recent request had the same head, else ((), None); and
    ((), None) when there is no head or the store would round it (it keeps neither the model's dtype nor float32)."""
    store = chunks.store
    if not head or store.dtype not in (chunks.fwd.dtype, torch.float32):
        return (), None
    key = chain_key(chunks.fingerprint, scope_root(chunks.scope), head)
    kv = store.get(key, len(head))
    if kv is not None:
        return (CachedSpan(0, kv),), None
    return (), key if chunks.source.head_seen(key) else None  # stored from its second request on


def store_head(plan: PrefillPlan, result: PrefillResult, store: KVStore) -> None:
    """After a prefill whose first pass (the probe pass, when there is one) captured the prompt's head: store it."""
    key = plan.report.head_key
    first = plan.report.probe if plan.report.probe is not None else result
    if key is None or first is None or first.captured is None:
        return
    store.put(key, first.captured)
