"""Query-aware selection (``selection="query"``): recompute the cached tokens the prompt's question reads.

The paper ranks cached tokens by how far their KV at one early layer deviates from a fresh computation. On
models whose reused KV is off almost everywhere (small models with few KV heads: see docs/BENCHMARKS.md) that
ranking spends the budget on tokens nothing reads, and recomputing them can even move the answer further from
full recompute. What the answer depends on is the KV the prompt's tail attends to. So, in the spirit of
ProphetKV (Wang et al., 2026), selection runs in two passes over the same stored KV:

1. a probe pass, as ``full_reuse`` runs it (stored KV for every chunk, only the uncached rows computed), in
   which the probe rows (the uncached rows after the first chunk: the question and the template around it)
   measure, at each layer of the model's second half, the share of their attention to cached tokens that
   each cached token receives (early layers attend by position and to attention sinks; deeper ones by
   meaning, and those are what the answer reads: on Qwen2.5-0.5B, summing the second half chose better than
   summing all layers or taking each token's maximum, see docs/BENCHMARKS.md);
2. the prefill proper, which recomputes through every layer the cached tokens with the largest share summed
   over those layers (plus every uncached row and any forced chunk heads).

The probe pass costs about what ``full_reuse`` costs (a few percent of a full prefill); in exchange, no layer
runs for every token. With ``fidelity_target`` the number of tokens is chosen per request: the fewest whose
summed share reaches the target fraction of the total, within ``[min_ratio, max_ratio]`` of the cached tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..model.forward import ModelForward
from .kv_cache import KVCache
from .prefill import PrefillPlan, PrefillResult, cached_rows_mask, prefill
from .selection import Budget, attention_mass, choose, mask_rows

PROBE_BLOCK = 64  # probe rows per attention-mass block (bounds the [heads, probes, N] scores)
MAX_PROBES = 512  # the last probe rows are enough to know what the question reads
FIRST_SCORED_LAYER = 0.5  # score the layers from this fraction of the depth on


class TailAttention:
    """Observer for a probe pass: per cached row, the share of the probe rows' attention to cached rows it gets,
    summed over the layers from ``first_layer`` on.

    from_cache: [N] bool; probes: [P] indices, into the rows the probe pass computes, of the probe rows (found
    once per request, so the layer loop never waits for the device to count them).
    """

    def __init__(self, from_cache: torch.Tensor, probes: torch.Tensor, scale: float, first_layer: int = 0) -> None:
        self.from_cache = from_cache
        self.probes = probes
        self.scale = scale
        self.first_layer = first_layer
        self.scores = torch.zeros(from_cache.shape[0], dtype=torch.float32, device=from_cache.device)

    def __call__(self, layer: int, q: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """q: [Hq, M, D] rotated queries of ``rows``: [M]; keys: [Hkv, N, D] rotated. At the last layer only the
        last row is computed: it is the probe then."""
        if layer < self.first_layer:
            return
        probes = self.probes if rows.shape[0] > 1 else torch.zeros(1, dtype=torch.long, device=rows.device)
        mass = torch.zeros_like(self.scores)
        for i in range(0, probes.shape[0], PROBE_BLOCK):
            block = probes[i : i + PROBE_BLOCK]
            mass += attention_mass(q[:, block], rows[block], keys, self.scale)
        mass = mass * self.from_cache
        self.scores += mass / mass.sum().clamp_min(1e-30)


def probe_start(plan: PrefillPlan) -> int:
    """First row that may probe: the start of the first cached chunk (rows before it cannot see any chunk)."""
    return min((span.start for span in plan.spans), default=0)


def select_by_query(
    fwd: ModelForward, plan: PrefillPlan, cache: KVCache, budget: Budget
) -> tuple[PrefillPlan, torch.Tensor, PrefillResult]:
    """Run the probe pass of ``plan`` (a cacheblend plan: spans and forced rows) into ``cache`` and return the
    plan that recomputes the forced rows plus the chosen cached rows through every layer, the scores [N] and the
    probe pass's result (its FLOPs).

    Row counts come from the plan on the host, so nothing is read from the device between the passes either;
    only a fidelity target (how many rows reach it depends on the scores) reads the scores back, once."""
    n = plan.ids.shape[0]
    device = plan.ids.device
    from_cache = cached_rows_mask(n, plan.spans, device)
    n_cached = plan.n_cached
    forced = plan.forced if plan.forced is not None else ~from_cache
    n_forced, n_forced_cached = plan.forced_counts(from_cache)
    initial = mask_rows(forced, n_forced)  # the rows the probe pass computes, sorted
    # probe rows, as indices into ``initial``: the computed rows from the first chunk on. Every row before it is
    # uncached, hence computed, so they are the computed rows after the first probe_start ones.
    count = min(n_forced - probe_start(plan), MAX_PROBES)
    if count > 0:
        probes = torch.arange(n_forced - count, n_forced, device=device)
    else:  # nothing uncached after the first chunk: the last row probes
        probes = torch.arange(n_forced - 1, n_forced, device=device)
    tail = TailAttention(from_cache, probes, fwd.scale, first_layer=int(FIRST_SCORED_LAYER * fwd.n_layers))
    probe = replace(plan, initial=initial, checks={}, observe=tail, capture=None)
    probe_result = prefill(fwd, probe, cache)
    candidates = from_cache & ~forced  # [N] bool
    n_candidates = n_cached - n_forced_cached
    if budget.target is None:
        keep_cached = round(budget.ratio * n_cached)
    else:
        keep_cached = budget.rows(tail.scores[candidates], n_cached, n_forced_cached)
    k = max(0, min(keep_cached - n_forced_cached, n_candidates))
    keep = choose(tail.scores, forced, candidates, k, n_forced)  # [n_forced + k] sorted rows
    # the probe pass left every chunk's K/V rotated in the cache: the prefill proper writes only its own rows
    mask = forced.clone().index_fill_(0, keep, True)
    chosen = replace(
        plan, initial=keep, forced=mask, n_forced=(n_forced + k, n_forced_cached + k), checks={}, cache_ready=True
    )
    return chosen, tail.scores, probe_result
