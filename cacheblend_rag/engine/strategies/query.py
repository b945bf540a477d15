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
runs for every token. It also yields ``full_reuse``'s distribution of the first new token for free: with
``guard_ratio`` set, a blend whose first token differs from it (blending changed the answer, and either may be
wrong) is run again recomputing that larger share of the cached rows, the probe's highest ranked (``review``).
With ``fidelity_target`` the number of tokens is chosen per request: the fewest whose
summed share reaches the target fraction of the total, within ``[min_ratio, max_ratio]`` of the cached tokens.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace

import torch

from ..plan import PrefillPlan
from ..prefill import cached_rows_mask, prefill_steps, run_to_end, timed_steps
from ..selection import Budget, attention_mass, choose, mask_rows
from .base import Selection
from .reuse import ReusedChunks

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


class QuerySelection(Selection):
    """Recompute, through every layer, the cached rows the probe pass saw the prompt's tail read most."""

    name = "query"
    options = frozenset({"guard_ratio"})

    def __init__(self, config) -> None:
        super().__init__(config)
        self.budget = Budget.of(config)
        self.scored: tuple[ReusedChunks, TailAttention] | None = None  # the request's probe pass, for ``review``

    def plan(self, reused: ReusedChunks, fwd, cache) -> PrefillPlan:
        """``plan_steps`` run to its end: the probe pass and the plan in one go."""
        return run_to_end(self.plan_steps(reused, fwd, cache))

    def plan_steps(self, reused: ReusedChunks, fwd, cache) -> Generator[int, None, PrefillPlan]:
        """Run the probe pass over ``reused`` into ``cache``, a layer per step (each yields the rows that layer
        computed, as ``prefill_steps`` does), and return the plan that recomputes the forced rows plus the chosen
        cached rows through every layer, on the K/V the probe pass left in ``cache``. The report's ``probe_s``
        counts the time spent in these steps, not between them.

        Row counts come from the host, so nothing is read from the device between the passes either; only a
        fidelity target (how many rows reach it depends on the scores) reads the scores back, once."""
        if not reused.spans:  # nothing cached: every row is computed, as the other selections compute it
            return PrefillPlan(ids=reused.ids, forced=reused.forced, n_forced=reused.n_forced, report=reused.report)
        t = time.perf_counter()
        probe_plan, tail = self.probe_plan(reused, fwd)
        spent = time.perf_counter() - t
        probe, probe_s = yield from timed_steps(prefill_steps(fwd, probe_plan, cache))
        t = time.perf_counter()
        keep, k = self.choose_rows(reused, tail)
        self.scored = (reused, tail)
        head = reused.computed_head
        report = replace(reused.report, probe=probe, probe_s=spent + probe_s + time.perf_counter() - t, kept=head)
        # the probe pass left every chunk's K/V rotated in the cache, and the head's exact: the prefill proper
        # writes only its own rows
        n_forced, n_forced_cached = reused.n_forced
        return PrefillPlan(
            ids=reused.ids,
            spans=reused.spans,
            initial=keep,
            forced=self.proper_forced(reused).index_fill_(0, keep, True),
            n_forced=(n_forced - head + k, n_forced_cached + k),
            cache_ready=True,
            report=report,
        )

    @staticmethod
    def proper_forced(reused: ReusedChunks) -> torch.Tensor:
        """[N] bool: the forced rows the prefill proper computes: every one but the prompt's head (the rows before
        the first chunk). The head sees only itself, all computed in the probe pass, so the K/V the probe pass
        left there is the head's exact K/V: computing it again would only repeat it."""
        forced = reused.forced.clone()
        forced[: reused.spans[0].start] = False  # the rows the probe pass computed there, and the exact ones
        return forced

    def probe_plan(self, reused: ReusedChunks, fwd) -> tuple[PrefillPlan, TailAttention]:
        """The probe pass's plan (``full_reuse``'s rows) and the observer that scores the cached rows in it."""
        ids, spans, forced = reused.ids, reused.spans, reused.forced
        n, device = ids.shape[0], ids.device
        from_cache = cached_rows_mask(n, spans, device)
        n_forced = reused.n_forced[0]
        initial = mask_rows(forced, n_forced)  # the rows the probe pass computes, sorted
        # probe rows, as indices into ``initial``: the computed rows from the first chunk on. Every row before it
        # is uncached, hence computed (unless read exact from the store), so they are the computed rows after the
        # first ``computed_head`` ones.
        count = min(n_forced - reused.computed_head, MAX_PROBES)
        if count > 0:
            probes = torch.arange(n_forced - count, n_forced, device=device)
        else:  # nothing uncached after the first chunk: the last row probes
            probes = torch.arange(n_forced - 1, n_forced, device=device)
        tail = TailAttention(from_cache, probes, fwd.scale, first_layer=int(FIRST_SCORED_LAYER * fwd.n_layers))
        plan = PrefillPlan(
            ids=ids,
            spans=spans,
            initial=initial,
            forced=forced,
            n_forced=reused.n_forced,
            observe=tail,
            exact=reused.exact,
            capture=reused.capture,
        )
        return plan, tail

    def choose_rows(self, reused: ReusedChunks, tail: TailAttention) -> tuple[torch.Tensor, int]:
        """After the probe pass: the rows the prefill proper computes ([n_forced - head + k] sorted: the forced rows
        after the prompt's head and the k cached ones ``tail`` scored highest, k within the budget), and k."""
        n_cached = reused.n_cached
        n_forced, n_forced_cached = reused.n_forced
        candidates = tail.from_cache & ~reused.forced  # [N] bool
        n_candidates = n_cached - n_forced_cached
        if self.budget.target is None:
            keep_cached = round(self.budget.ratio * n_cached)
        else:
            keep_cached = self.budget.rows(tail.scores[candidates], n_cached, n_forced_cached)
        k = max(0, min(keep_cached - n_forced_cached, n_candidates))
        head = reused.computed_head
        return choose(tail.scores, self.proper_forced(reused), candidates, k, n_forced - head), k

    def review(self, plan: PrefillPlan, result) -> PrefillPlan | None:
        """The guard: None if the blend's first token is full_reuse's (the probe pass's), or no guard is set, or it
        would recompute no more rows; else the plan that recomputes ``guard_ratio`` of the cached rows (the probe's
        highest ranked, and every row this plan computed) through every layer, on the same cache.

        Reads the two argmaxes back from the device (one sync, after the prefill; the stats read it anyway)."""
        ratio, probe = self.config.guard_ratio, plan.report.probe
        if ratio is None or probe is None or self.scored is None or result.logits is None or probe.logits is None:
            return None
        blended, reused_first = int(result.logits.argmax()), int(probe.logits.argmax())
        if blended == reused_first:
            return None
        reused, tail = self.scored
        n_forced, n_forced_cached = reused.n_forced
        candidates = tail.from_cache & ~reused.forced  # [N] bool
        k = max(0, min(round(ratio * reused.n_cached) - n_forced_cached, reused.n_cached - n_forced_cached))
        if n_forced_cached + k <= plan.n_forced[1]:  # no more rows than this plan computed
            return None
        head = reused.computed_head
        chosen = choose(tail.scores, self.proper_forced(reused), candidates, k, n_forced - head)
        mask = plan.forced.clone().index_fill_(0, chosen, True)
        count = int(mask.sum())  # the rows this plan computed and the new ones may overlap only partly on ties
        uncached = plan.n - plan.n_cached - reused.spans[0].start  # the head's rows are kept as they are
        why = f"first token {blended} differs from full_reuse's {reused_first}"
        why += f": recomputed {100 * ratio:.0f}% of the cached rows"
        return replace(
            plan,
            initial=mask_rows(mask, count),
            forced=mask,
            n_forced=(count, count - uncached),
            report=replace(plan.report, guard=why, rejected=result),
        )
