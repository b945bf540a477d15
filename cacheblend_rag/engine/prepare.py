"""A request's prefill, driven: its strategy plans it, the prefill runs the plan, the strategy finishes.

A chunk read lazily from a slow tier can still fail inside a layer loop (the query selection's probe pass or the
prefill; corrupt, vanished, too slow). The loop then stops with ChunkReadError; the request is planned again with
that chunk computed (a miss), and the new plan runs from the start into the same cache. Nothing is computed inside
the loop but the plan.

After the prefill, the strategy may review its result before anything is answered (``Strategy.review``: the query
selection's guard); a plan it returns then runs into the same cache, from the first layer, a layer per step too.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..model.forward import ModelForward
from ..store import ChunkReadError, KVStore
from .chunk_reads import RequestChunks
from .decode import decode_step
from .kv_cache import KVCache
from .plan import PrefillPlan
from .prefill import PrefillResult, prefill_steps, run_to_end, timed_steps
from .segments import TokenRun
from .stats import RequestStats, request_stats
from .strategies import Strategy

T = TypeVar("T")


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
    """``run_strategy`` a step at a time, for a scheduler that interleaves prefills with decoding: the plan's steps
    (``strategy.plan_steps``: a selection's probe pass, a layer per step), then the prefill a layer per step
    (``prefill_steps``); each yields the rows its layer computed. Each step runs under inference mode, never across
    a yield; ``stats.prefill_s`` counts the steps' time (the probe pass's and the prefill's, not the chunk reads),
    not the time between them."""
    while True:
        try:
            plan = yield from inference_steps(strategy.plan_steps(runs, chunks, fwd, cache))
            result, spent = yield from inference_steps(timed_steps(prefill_steps(fwd, plan, cache)))
            t = time.perf_counter()
            with torch.inference_mode():
                again = strategy.review(plan, result)  # a guard may find the answer suspect: a larger share then
            spent += time.perf_counter() - t
            if again is not None:
                plan = again
                result, more = yield from inference_steps(timed_steps(prefill_steps(fwd, plan, cache)))
                spent += more
        except ChunkReadError as exc:  # read lazily, by the probe pass or the prefill: plan again with it computed
            chunks.read_failed(exc)
            continue
        break
    with torch.inference_mode():  # the first reads from the device since the plan was made
        stats = request_stats(plan, result, plan.report.probe_s + spent)
    strategy.finish(plan, result, store)
    return plan, result, stats


def inference_steps(steps: Generator[int, None, T]) -> Generator[int, None, T]:
    """Pass on the yields of ``steps``, running each of its steps under inference mode (never across a yield: the
    mode is the thread's, and another request may run in between); return its value."""
    while True:
        with torch.inference_mode():
            try:
                rows = next(steps)
            except StopIteration as done:
                return done.value
        yield rows
