"""Per-request statistics (derived from a request's plan and its prefill's result) and the engine's cumulative
counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..counters import Counters
from .plan import PrefillPlan
from .prefill import PrefillResult


@dataclass
class RequestStats:
    """What one request reused and recomputed, and where its time went.

    prompt_tokens: tokens in the prompt. cached_tokens: prompt tokens of chunks whose KV came from the store.
    head_tokens: tokens of the prompt's head (the rows before its first chunk) whose exact KV an earlier request
    stored (engine/strategies/reuse.py): reused, never recomputed; 0 when this request computed the head.
    recomputed_tokens: tokens computed through every layer (all uncached tokens plus the cached tokens a
    strategy chose to recompute). reused_tokens: prompt_tokens - recomputed_tokens.
    layer_rows: rows computed at each layer. prefill_flops: multiply-adds x 2 of the prefill.
    recompute_ratio: for cacheblend, the share of the cached tokens recomputed through the last layer (forced
    chunk heads included); with a fidelity target, the ratio the request chose. probe_s: the query-aware
    selection's probe pass (part of prefill_s). graph_steps: decoding steps replayed from a CUDA graph.
    unplaced_chunks: chunks in the prompt computed instead of reused because their stored KV would be read out of
    the context it was computed in (the prompt's head or end: engine/placement.py); fallback: why a request that
    holds chunks was computed in full, or None. guard: why the prefill was run again with a larger share (the
    blend's first token differed from full_reuse's: ``BlendConfig.guard_ratio``), or None; its FLOPs and time
    count both passes.
    """

    strategy: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    head_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    new_tokens: int = 0
    recompute_ratio: float | None = None
    load_s: float = 0.0
    probe_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    prefill_flops: float = 0.0
    graph_steps: int = 0
    unplaced_chunks: int = 0
    fallback: str | None = None
    guard: str | None = None
    layer_rows: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


def request_stats(plan: PrefillPlan, result: PrefillResult, prefill_s: float = 0.0) -> RequestStats:
    """The stats of a request from its plan and its prefill's result (reads the prefill's FLOPs back from the
    device: one sync, after the prefill). prefill_s: the prefill's time, the probe pass's included."""
    report = plan.report
    n, cached = plan.n, plan.n_cached
    # rows computed through the last layer, and those a probe pass computed exactly and the prefill kept
    recomputed = int(result.rows.shape[0]) + report.kept
    ratio = None
    if report.blend and cached:  # every uncached row is computed (an exact head is read): the rest were cached
        ratio = (recomputed - (n - cached - report.exact)) / cached
    flops = result.flops + sum(r.flops for r in (report.probe, report.hop, report.rejected) if r is not None)
    return RequestStats(
        strategy=report.strategy,
        prompt_tokens=n,
        cached_tokens=cached,
        head_tokens=report.exact,
        reused_tokens=n - recomputed,
        recomputed_tokens=recomputed,
        cache_hits=report.hits,
        cache_misses=report.misses,
        recompute_ratio=ratio,
        load_s=report.load_s,
        probe_s=report.probe_s,
        prefill_s=prefill_s,
        prefill_flops=flops,
        unplaced_chunks=report.unplaced,
        fallback=report.fallback,
        guard=report.guard,
        layer_rows=list(result.layer_rows),
    )


class EngineMetrics(Counters):
    """The engine's cumulative counters (thread-safe), read through ``snapshot()``."""

    FIELDS = (
        "requests",
        "prompt_tokens",
        "reused_tokens",
        "recomputed_tokens",
        "generated_tokens",
        "cache_hits",
        "cache_misses",
        "precomputed_chunks",
        "precompute_cache_hits",
        "computed_on_miss",
        "abandoned_requests",
        "unplaced_chunks",
    )

    def record(self, stats: RequestStats, abandoned: bool = False) -> None:
        self.add(
            requests=1,
            abandoned_requests=int(abandoned),
            prompt_tokens=stats.prompt_tokens,
            reused_tokens=stats.reused_tokens,
            recomputed_tokens=stats.recomputed_tokens,
            generated_tokens=stats.new_tokens,
            cache_hits=stats.cache_hits,
            cache_misses=stats.cache_misses,
            unplaced_chunks=stats.unplaced_chunks,
        )
