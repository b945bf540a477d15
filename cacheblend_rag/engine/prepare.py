"""A request's prefill, driven: its strategy plans it, the prefill runs the plan, the strategy finishes.

A chunk read lazily from a slow tier can still fail inside the layer loop (corrupt, vanished, too slow). The loop
then stops with ChunkReadError; the request is planned again with that chunk computed (a miss), and the new plan
runs from the start into the same cache. Nothing is computed inside the loop but the plan.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import torch

from ..model.forward import ModelForward
from ..store import ChunkReadError, KVStore
from .chunk_reads import RequestChunks
from .decode import decode_step
from .kv_cache import KVCache
from .plan import PrefillPlan
from .prefill import PrefillResult, prefill_steps, run_to_end
from .segments import TokenRun
from .stats import RequestStats, request_stats
from .strategies import Strategy


@dataclass
class PreparedRequest:
    """State right after the prefill: the fused cache, the logits of the first new token, the request's stats, and
    the forward (on the request's kernels) that decoding continues with."""

    cache: KVCache
    logits: torch.Tensor  # [vocab] float32
    stats: RequestStats
    prompt_ids: list[int]
    started: float  # perf_counter() when the request arrived
    fwd: ModelForward

    def decode(self, token: int) -> torch.Tensor:
        """Append ``token`` to the cache and return the next token's logits [vocab] (float32): one eager decoding
        step, e.g. to teacher-force a reference answer (``cache.truncate`` rewinds to the prompt's end first)."""
        with torch.inference_mode():
            return decode_step(self.fwd, self.cache, token)


def run_strategy(
    strategy: Strategy, runs: list[TokenRun], chunks: RequestChunks, fwd: ModelForward, cache: KVCache, store: KVStore
) -> tuple[PrefillPlan, PrefillResult, RequestStats]:
    """Plan the request (again, with the chunk computed, each time a chunk's read fails inside the prefill), run the
    plan into ``cache``, derive the stats, and let the strategy finish (prefix_cache stores what it computed)."""
    return run_to_end(run_strategy_steps(strategy, runs, chunks, fwd, cache, store))


def run_strategy_steps(
    strategy: Strategy, runs: list[TokenRun], chunks: RequestChunks, fwd: ModelForward, cache: KVCache, store: KVStore
) -> Generator[int, None, tuple[PrefillPlan, PrefillResult, RequestStats]]:
    """``run_strategy`` a step at a time, for a scheduler that interleaves prefills with decoding: the plan is one
    step (a selection's probe pass runs in it: the step yields its rows x layers), then the prefill a layer per step
    (``prefill_steps``: the rows each layer computed). Each step runs under inference mode, never across a yield;
    ``stats.prefill_s`` counts the steps' time, not the time between them."""
    while True:
        try:
            with torch.inference_mode():
                plan = strategy.plan(runs, chunks, fwd, cache)  # a probe pass reads the chunks here
            spent = plan.report.probe_s  # the prefill's time includes the probe pass, not the chunk reads
            if plan.report.probe is not None:  # the probe pass was a step of its own
                yield sum(plan.report.probe.layer_rows)
            steps = prefill_steps(fwd, plan, cache)
            while True:
                t = time.perf_counter()
                with torch.inference_mode():
                    try:
                        rows = next(steps)
                    except StopIteration as done:
                        result = done.value
                        # the first reads from the device since the plan was made: on a GPU, this includes the work
                        stats = request_stats(plan, result, spent + time.perf_counter() - t)
                        break
                spent += time.perf_counter() - t
                yield rows
        except ChunkReadError as exc:  # read lazily, by the probe pass or the prefill: plan again with it computed
            chunks.read_failed(exc)
            continue
        break
    strategy.finish(plan, result, store)
    return plan, result, stats
