"""A request's prefill, driven: its strategy plans it, the prefill runs the plan, the strategy finishes.

A chunk read lazily from a slow tier can still fail inside the layer loop (corrupt, vanished, too slow). The loop
then stops with ChunkReadError; the request is planned again with that chunk computed (a miss), and the new plan
runs from the start into the same cache. Nothing is computed inside the loop but the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.forward import ModelForward
from ..store import ChunkReadError, KVStore
from .chunk_reads import RequestChunks
from .decode import decode_step
from .kv_cache import KVCache
from .plan import PrefillPlan
from .prefill import PrefillResult, prefill
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
    while True:
        try:
            with torch.inference_mode():
                plan = strategy.plan(runs, chunks, fwd, cache)
                t = time.perf_counter()
                result = prefill(fwd, plan, cache)
                # the first reads from the device since the plan was made: on a GPU, this includes the queued work
                stats = request_stats(plan, result, plan.report.probe_s + time.perf_counter() - t)
            break
        except ChunkReadError as exc:
            chunks.read_failed(exc)
    strategy.finish(plan, result, store)
    return plan, result, stats
