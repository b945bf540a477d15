"""Selection that follows the bridge (``selection="bridge"``): the rows the question reads, then the rows those read.

A two-passage question ("How many beds does the hospital where the mayor once worked have?") reads one passage (the
mayor's, which names the hospital), and that passage's rows must read another (the hospital's beds) for the answer
to come out. The query selection recomputes the cached rows the prompt's tail reads (hop 1); the rows of other
chunks that *those* rows read (hop 2) are recomputed only if the tail reads them too. This selection splits the
budget: three passes over the layers, each on the cache the one before left.

1. the probe pass of the query selection (``full_reuse``'s rows; the tail's attention to each cached row, second
   half of the layers);
2. the hop pass: the ``HOP_SHARE`` of the budget the probe ranked highest (hop 1), alone, computed through every
   layer on the cache the probe left (hop-1 rows read only rows before them: chunks, and the uncached rows between
   chunks as the probe computed them), measuring for each hop-1 row the share of its attention to the cached rows
   of *other* chunks that each row gets (second half of the layers); hop 1's K/V stays in the cache;
3. the prefill proper: the forced rows plus the rest of the budget by that share (hop 2), on that cache.

As many rows are computed as by the query selection, as often (hop 1 in the hop pass, the forced rows and hop 2
in the prefill proper: about its FLOPs, plus the hop pass's own overhead and its scores, [Hkv, G x 64, N] per
block of 64 hop-1 rows at each scored layer, growing with the budget times the prompt). Hop 1 never sees hop 2
fresh, as in CacheBlend no recomputed row sees the rows left stale. So with every cached row recomputed the plan
is the query selection's (nothing is left to choose, and one pass over all of them is exact). Measured in
docs/BENCHMARKS.md (1.10): it helps chunks computed alone on two-passage questions, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace

import torch

from ..plan import PrefillPlan
from ..prefill import prefill_steps, timed_steps
from ..selection import choose, cross_chunk_shares
from ..transfer import upload
from .query import FIRST_SCORED_LAYER, PROBE_BLOCK, QuerySelection
from .reuse import ReusedChunks

HOP_SHARE = 0.5  # of the cached rows recomputed: the tail's most read (hop 1); the rest: what hop 1 reads (hop 2)


class CrossChunkReads:
    """Observer for the hop pass: per prompt row, the share of each reader's attention to the cached rows of other
    chunks than its own that the row gets, summed over the readers and the layers from ``first_layer`` on.

    chunk_of: [N] int64, each row's chunk (-1: not cached); readers: [R] indices, into the rows the hop pass
    computes, of the hop-1 rows (found on the host, so the layer loop never waits for the device)."""

    def __init__(self, chunk_of: torch.Tensor, readers: torch.Tensor, scale: float, first_layer: int) -> None:
        self.chunk_of = chunk_of
        self.readers = readers
        self.scale = scale
        self.first_layer = first_layer
        self.scores = torch.zeros(chunk_of.shape[0], dtype=torch.float32, device=chunk_of.device)

    def __call__(self, layer: int, q: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """q: [Hq, M, D] rotated queries of ``rows``: [M]; keys: [Hkv, N, D] rotated."""
        if layer < self.first_layer:
            return
        for i in range(0, self.readers.shape[0], PROBE_BLOCK):
            block = self.readers[i : i + PROBE_BLOCK]
            self.scores += cross_chunk_shares(q[:, block], rows[block], keys, self.scale, self.chunk_of)


def chunk_index(reused: ReusedChunks) -> torch.Tensor:
    """[N] int64 on the model's device: the index of the chunk each row comes from, -1 for uncached rows (built on
    the host)."""
    chunk_of = torch.full((reused.ids.shape[0],), -1, dtype=torch.long)
    for i, span in enumerate(reused.spans):
        chunk_of[span.start : span.end] = i
    return upload(chunk_of, reused.ids.device)


class BridgeSelection(QuerySelection):
    """The query selection's budget split between the cached rows the tail reads and the rows those read in other
    chunks (module docstring)."""

    name = "bridge"
    options = frozenset()

    def plan_steps(self, reused: ReusedChunks, fwd, cache) -> Generator[int, None, PrefillPlan]:
        """The probe pass, the hop pass and the plan of the prefill proper, a layer per step (as
        ``QuerySelection.plan_steps``); the report's ``probe_s`` counts the time spent in both passes' steps and
        ``hop`` holds the hop pass's result (its FLOPs count in the request's)."""
        if not reused.spans:
            return (yield from super().plan_steps(reused, fwd, cache))
        t = time.perf_counter()
        probe_plan, tail = self.probe_plan(reused, fwd)
        spent = time.perf_counter() - t
        probe, probe_s = yield from timed_steps(prefill_steps(fwd, probe_plan, cache))
        t = time.perf_counter()
        keep, k = self.choose_rows(reused, tail)
        n_forced, n_forced_cached = reused.n_forced
        n_candidates = reused.n_cached - n_forced_cached
        head = reused.computed_head
        hop1 = round(HOP_SHARE * k)
        if hop1 == 0 or k >= n_candidates:  # nothing to split: the query selection's plan, one pass over the rows
            report = replace(reused.report, probe=probe, probe_s=spent + probe_s + time.perf_counter() - t, kept=head)
            return self.proper_plan(reused, keep, k, report)
        proper = self.proper_forced(reused)  # [N] bool
        candidates = tail.from_cache & ~reused.forced  # [N] bool
        rows1 = choose(tail.scores, torch.zeros_like(proper), candidates, hop1, 0)  # [k1] sorted: hop 1 alone
        is_hop1 = torch.zeros_like(proper).index_fill_(0, rows1, True)  # [N] bool
        readers = torch.arange(hop1, device=rows1.device)  # every row the hop pass computes reads
        reads = CrossChunkReads(chunk_index(reused), readers, fwd.scale, int(FIRST_SCORED_LAYER * fwd.n_layers))
        hop_plan = PrefillPlan(
            ids=reused.ids,
            spans=reused.spans,
            initial=rows1,
            forced=is_hop1,
            n_forced=(hop1, hop1),
            cache_ready=True,
            need_logits=False,
            observe=reads,
        )
        spent += time.perf_counter() - t
        hop, hop_s = yield from timed_steps(prefill_steps(fwd, hop_plan, cache))
        t = time.perf_counter()
        rows2 = choose(reads.scores, proper, candidates & ~is_hop1, k - hop1, n_forced - head)  # [F + k2] sorted
        probe_s = spent + probe_s + hop_s + time.perf_counter() - t
        report = replace(reused.report, probe=probe, hop=hop, probe_s=probe_s, kept=head + hop1)
        return self.proper_plan(reused, rows2, k - hop1, report)

    def proper_plan(self, reused: ReusedChunks, rows: torch.Tensor, k: int, report) -> PrefillPlan:
        """The prefill proper on the ready cache: the forced rows after the prompt's head plus ``k`` cached rows
        (``rows``: [n_forced - head + k] sorted)."""
        n_forced, n_forced_cached = reused.n_forced
        return PrefillPlan(
            ids=reused.ids,
            spans=reused.spans,
            initial=rows,
            forced=self.proper_forced(reused).index_fill_(0, rows, True),
            n_forced=(n_forced - reused.computed_head + k, n_forced_cached + k),
            cache_ready=True,
            report=report,
        )
