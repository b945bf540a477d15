"""The blended prefill: one loop over layers that serves every strategy.

A plan says which prompt rows have stored KV (``spans``), which rows are computed from layer 0
(``initial``: all for full_recompute and cacheblend, the uncached rows for full_reuse and prefix_cache)
and at which layers cacheblend narrows the computed rows (``checks``). At each layer:

1. the stored pre-RoPE K and V of the cached rows are copied into the fused cache;
2. Q/K/V are computed for the selected rows; at a check layer the deviation of their fresh K or V from
   the stored one picks the rows to keep (top ratio x cached rows, plus every forced row);
3. the selected rows' K/V overwrite theirs (at a check layer every computed row is written), all keys
   are rotated to their absolute positions;
4. attention runs for the kept rows over all keys with an exact causal mask by position, then the MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels import scatter_rows
from ..model.forward import ModelForward
from ..store.chunk import ChunkKV
from .kv_cache import KVCache
from .selection import Budget, attention_mass, choose, deviation_scores, probe_rows
from .stale_shift import shift_stale_rows, span_index


@dataclass
class CachedSpan:
    """Prompt rows start..start+T-1 take their KV from ``kv`` ([L, Hkv, T, D], keys before RoPE)."""

    start: int
    kv: ChunkKV

    @property
    def end(self) -> int:
        return self.start + self.kv.n_tokens


@dataclass
class PrefillPlan:
    ids: torch.Tensor  # [N] token ids
    spans: list[CachedSpan] = field(default_factory=list)
    initial: torch.Tensor | None = None  # [M0] sorted rows computed from layer 0; None = all rows
    forced: torch.Tensor | None = None  # [N] bool: rows a check layer must keep
    checks: dict[int, float] = field(default_factory=dict)  # layer -> ratio of cached rows kept
    deviation: str = "v"
    selection: str = "deviation"  # "deviation" or "attention" (deviation x attention from the prompt's tail)
    capture: tuple[int, int] | None = None  # rows whose pre-RoPE K and V to return
    need_logits: bool = True
    budget: Budget | None = None  # with a fidelity target: how many rows the last check layer keeps
    cache_ready: bool = False  # the cache already holds every span's rotated K/V (a probe pass wrote it): only
    # the computed rows are rotated and written
    shift_stale: bool = False  # move stale cached rows by their chunk's mean fresh - stored change (stale_shift.py)
    observe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None  # (layer, q, rows, keys)


@dataclass
class PrefillResult:
    logits: torch.Tensor | None  # [vocab] float32 at the last prompt position
    rows: torch.Tensor  # [M] rows computed through the last layer
    layer_rows: list[int]
    flops: float
    captured: ChunkKV | None


def layer_flops(fwd: ModelForward) -> tuple[float, float, float]:
    """FLOPs per row of one layer: (k/v projections, q projection, output projection + MLP)."""
    hidden, inner, kv = fwd.hidden_size, fwd.n_heads * fwd.head_dim, fwd.n_kv_heads * fwd.head_dim
    intermediate = fwd.config.intermediate_size
    return 2.0 * hidden * 2 * kv, 2.0 * hidden * inner, 2.0 * (inner * hidden + 3 * hidden * intermediate)


def prefill(fwd: ModelForward, plan: PrefillPlan, cache: KVCache) -> PrefillResult:
    """Fill ``cache`` rows 0..N-1 for every layer following ``plan``; return the last position's logits.

    Runs on ``fwd``'s kernels. N prompt rows; M: the rows computed at the current layer (``sel``), which shrinks
    at check layers and to the last row after the last K/V is written.
    """
    ids = plan.ids  # [N]
    n = ids.shape[0]
    device = ids.device
    positions = torch.arange(n, device=device)  # [N]: row j is at position j
    from_cache = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    for span in plan.spans:
        from_cache[span.start : span.end] = True
    n_cached = int(from_cache.sum())
    last_cached_end = max((span.end for span in plan.spans), default=0)
    forced = plan.forced if plan.forced is not None else ~from_cache  # [N] bool
    sel = positions if plan.initial is None else plan.initial  # [M] sorted rows computed at this layer
    span_of_row, n_spans = span_index(n, plan.spans, device) if plan.shift_stale else (None, 0)
    h = fwd.embed(ids[sel])  # [M, hidden]: the residual stream of the computed rows
    kv_flops, q_flops, rest_flops = layer_flops(fwd)
    flops = 0.0
    layer_rows: list[int] = []
    captured_k: list[torch.Tensor] = []
    captured_v: list[torch.Tensor] = []
    if plan.cache_ready and (plan.checks or plan.capture or plan.shift_stale):
        raise ValueError("a plan on a ready cache computes a fixed set of rows: no checks, capture or shift")
    cache.length = n
    for layer in range(fwd.n_layers):
        keys, values = cache.layer(layer, n)  # [Hkv, N, D] views of the fused cache
        if not plan.cache_ready:
            for span in plan.spans:
                k_stored, v_stored = span.kv.layer(layer)  # [Hkv, T, D], k before RoPE
                keys[:, span.start : span.end].copy_(k_stored)
                values[:, span.start : span.end].copy_(v_stored)
        x = fwd.attn_input(layer, h)  # [M, hidden] normalised
        k_new, v_new = fwd.project_kv(layer, x)  # [Hkv, M, D] each, k before RoPE
        if plan.cache_ready:
            k_new = fwd.rotate(k_new, sel)  # the cache's keys are rotated already: rotate the new ones alike
        flops += kv_flops * sel.shape[0]
        check = layer in plan.checks
        if check:
            sel_cached = from_cache[sel]  # [M] bool
            scores = deviation_scores(plan.deviation, sel, k_new, v_new, keys, values, sel_cached, fwd.kernels)  # [M]
        if span_of_row is not None and sel.shape[0] < n:
            shift_stale_rows(keys, values, sel, k_new, v_new, span_of_row, n_spans)
        scatter_rows(keys, sel, k_new)
        scatter_rows(values, sel, v_new)
        if plan.capture is not None:
            a, b = plan.capture
            captured_k.append(keys[:, a:b].clone())  # [Hkv, b - a, D] before RoPE
            captured_v.append(values[:, a:b].clone())
        if layer == fwd.n_layers - 1 and not plan.need_logits:
            layer_rows.append(0)
            break
        if not plan.cache_ready:
            fwd.rotate(keys, positions, out=keys)  # every key to its absolute position, in place
        if check:
            if plan.selection == "attention":
                probes = probe_rows(sel, sel_cached, last_cached_end)  # [P] indices into sel
                q_probe = fwd.project_q(layer, x[probes], sel[probes])  # [Hq, P, D]
                scores = scores * attention_mass(q_probe, sel[probes], keys, fwd.scale)[sel]
            sel_forced = forced[sel]
            budget = check_budget(plan, layer, n_cached, scores, sel_forced, sel_cached)
            keep = choose(scores, sel_forced, sel_cached, budget)  # [K] indices into sel
            x, h, sel = x[keep], h[keep], sel[keep]  # M := K
        layer_rows.append(sel.shape[0])
        rows = sel
        if layer == fwd.n_layers - 1:  # past the last K/V, only the last position's output (its logits) is used
            x, h, rows = x[-1:], h[-1:], sel[-1:]
        q = fwd.project_q(layer, x, rows)  # [Hq, M, D] rotated
        if plan.observe is not None:
            plan.observe(layer, q, rows, keys)
        attn = fwd.attend(q, rows, keys, values)  # [Hq, M, D]
        h = fwd.finish_layer(layer, h, attn)  # [M, hidden]
        flops += (q_flops + rest_flops) * rows.shape[0] + 4.0 * fwd.n_heads * fwd.head_dim * float((rows + 1).sum())
    logits = None
    if plan.need_logits:
        logits = fwd.logits(h[-1:])[0]
        flops += 2.0 * fwd.hidden_size * fwd.vocab_size
    captured = ChunkKV(torch.stack(captured_k), torch.stack(captured_v)) if plan.capture is not None else None
    return PrefillResult(logits=logits, rows=sel, layer_rows=layer_rows, flops=flops, captured=captured)


def check_budget(plan: PrefillPlan, layer: int, n_cached: int, scores, forced, sel_cached) -> int:
    """Cached rows a check layer keeps (forced ones included): its ratio of the ``n_cached`` cached rows, or at the
    last check layer of a plan with a fidelity target, the rows whose scores reach it. scores, forced, sel_cached:
    [M] over the rows computed at this layer."""
    if plan.budget is None or plan.budget.target is None or layer != max(plan.checks):
        return round(plan.checks[layer] * n_cached)
    candidates = sel_cached & ~forced
    return plan.budget.rows(scores[candidates], n_cached, int((sel_cached & forced).sum()))
