"""The blended prefill: one loop over layers that serves every strategy.

A plan (``engine/plan.py``, made by a strategy: ``engine/strategies/``) says which prompt rows have stored KV
(``spans``), which rows are computed from layer 0 (``initial``: all for full_recompute and the check-layer
selections, the uncached rows for full_reuse and prefix_cache, a fixed set for the query selection) and at which
layers the computed rows narrow (``checks``, scored by the plan's ``scorer``). Before the loop, the stored pre-RoPE
K and V of the cached chunks are queued into the fused cache (``transfer.StoredKV``: all layers at once from
the device tier, layer by layer on a side CUDA stream from the pinned host tier, as each layer arrives from
disk or Redis).
At each layer:

1. Q/K/V are computed for the selected rows; at a check layer the scorer's scores (the deviation of their fresh K
   or V from the stored one) pick the rows to keep (top ratio x cached rows, plus every forced row);
2. the selected rows' K/V overwrite theirs (at a check layer every computed row is written), all keys
   are rotated to their absolute positions;
3. attention runs for the kept rows over all keys with an exact causal mask by position, then the MLP.

**No host synchronisation in the loop.** Every count the loop needs (rows computed, rows kept at a check
layer, probe rows) comes from the plan on the host; index tensors are built from host data by the strategy,
so the kernels are bound to the prompt's positions and trust them instead of reading them back
(``ModelForward.within``), and kept rows are found
with a sort of known size instead of ``nonzero``. On a GPU the host therefore queues the whole prefill without
waiting; the only reads are after the loop (the FLOP count). One documented exception: a fidelity target
with a deviation selection (how many rows to keep depends on the scores: one read at the last check layer).
``tests/engine/test_no_sync.py`` holds the loop to this.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..kernels import scatter_rows
from ..model.forward import ModelForward
from ..store.chunk import ChunkKV
from .kv_cache import KVCache
from .plan import CachedSpan, PrefillPlan
from .selection import choose
from .transfer import StoredKV

T = TypeVar("T")


@dataclass
class PrefillResult:
    logits: torch.Tensor | None  # [vocab] float32 at the last prompt position
    rows: torch.Tensor  # [M] rows computed through the last layer
    layer_rows: list[int]
    matmul_flops: float  # FLOPs of the projections, MLP and logits (known on the host)
    attention_work: torch.Tensor | float  # sum over layers and computed rows of (position + 1), on the device
    attention_flops_per_key: float  # FLOPs per (query row, visible key) pair
    captured: ChunkKV | None

    @property
    def flops(self) -> float:
        """All FLOPs of the prefill (reads the attention work back from the device: call after the prefill)."""
        return self.matmul_flops + self.attention_flops_per_key * float(self.attention_work)


def layer_flops(fwd: ModelForward) -> tuple[float, float, float]:
    """FLOPs per row of one layer: (k/v projections, q projection, output projection + MLP)."""
    hidden, inner, kv = fwd.hidden_size, fwd.n_heads * fwd.head_dim, fwd.n_kv_heads * fwd.head_dim
    intermediate = fwd.config.intermediate_size
    return 2.0 * hidden * 2 * kv, 2.0 * hidden * inner, 2.0 * (inner * hidden + 3 * hidden * intermediate)


def cached_rows_mask(n: int, spans: tuple[CachedSpan, ...], device: torch.device) -> torch.Tensor:
    """[N] bool: the rows whose KV comes from the store (fills on the device, nothing read back)."""
    from_cache = torch.zeros(n, dtype=torch.bool, device=device)
    for span in spans:
        from_cache[span.start : span.end] = True
    return from_cache


def prefill(fwd: ModelForward, plan: PrefillPlan, cache: KVCache) -> PrefillResult:
    """Fill ``cache`` rows 0..N-1 for every layer following ``plan``; return the last position's logits
    (``prefill_steps`` run to its end)."""
    return run_to_end(prefill_steps(fwd, plan, cache))


def run_to_end(steps: Generator[object, None, T]) -> T:
    """Run a generator of steps (``prefill_steps``, ``engine.prepare_steps``) to its end; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def timed_steps(steps: Generator[int, None, T]) -> Generator[int, None, tuple[T, float]]:
    """Pass on the yields of ``steps``; return its value and the seconds spent inside its steps (not between them:
    another request may run there)."""
    spent = 0.0
    while True:
        t = time.perf_counter()
        try:
            rows = next(steps)
        except StopIteration as done:
            return done.value, spent + time.perf_counter() - t
        spent += time.perf_counter() - t
        yield rows


def prefill_steps(fwd: ModelForward, plan: PrefillPlan, cache: KVCache) -> Generator[int, None, PrefillResult]:
    """``prefill`` a layer at a time: yields after each layer the rows it computed (M), returns the PrefillResult.
    Nothing is read from the device at a yield; whoever steps it runs each step under ``torch.inference_mode``
    (never across a yield: the mode is the thread's, and another request may run in between).

    Runs on ``fwd``'s kernels. N prompt rows; M: the rows computed at the current layer (``sel``), which shrinks
    at check layers and to the last row after the last K/V is written.
    """
    ids = plan.ids  # [N]
    n = ids.shape[0]
    device = ids.device
    fwd = fwd.within(n)  # every position and row the loop passes lies in [0, n): nothing read back
    plan.check_spans()
    if plan.cache_ready and (plan.checks or plan.capture):
        raise ValueError("a plan on a ready cache computes a fixed set of rows: no checks or capture")
    if plan.checks and plan.initial is not None:
        raise ValueError("a plan with check layers computes every row up to its first check (initial=None)")
    positions = torch.arange(n, device=device)  # [N]: row j is at position j
    from_cache = cached_rows_mask(n, plan.spans, device)  # [N]
    n_cached = plan.n_cached
    n_forced, n_forced_cached = plan.forced_counts(from_cache)
    n_candidates = n_cached - n_forced_cached  # cached rows a check layer may keep or drop, all computed until then
    last_cached_end = max((span.end for span in plan.spans), default=0)
    forced = plan.forced if plan.forced is not None else ~from_cache  # [N] bool
    sel = positions if plan.initial is None else plan.initial  # [M] sorted rows computed at this layer
    h = fwd.embed(ids[sel])  # [M, hidden]: the residual stream of the computed rows
    kv_flops, q_flops, rest_flops = layer_flops(fwd)
    flops = 0.0
    work = torch.zeros((), dtype=torch.int64, device=device)  # sum of (position + 1) over attention rows
    layer_rows: list[int] = []
    captured_k: list[torch.Tensor] = []
    captured_v: list[torch.Tensor] = []
    cache.length = n
    stored = StoredKV((*plan.exact, *plan.spans) if not plan.cache_ready else [], cache)  # transfer.py: from where
    for layer in range(fwd.n_layers):
        keys, values = cache.layer(layer, n)  # [Hkv, N, D] views of the fused cache
        stored.layer(layer)
        x = fwd.attn_input(layer, h)  # [M, hidden] normalised
        k_new, v_new = fwd.project_kv(layer, x)  # [Hkv, M, D] each, k before RoPE
        if plan.cache_ready:
            k_new = fwd.rotate(k_new, sel)  # the cache's keys are rotated already: rotate the new ones
        flops += kv_flops * sel.shape[0]
        check = layer in plan.checks
        if check:
            sel_cached = from_cache[sel]  # [M] bool
            scores = plan.scorer.score(sel, k_new, v_new, keys, values, sel_cached, fwd.kernels)  # [M]
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
            scores = plan.scorer.weigh(layer, scores, x, sel, keys, fwd, n, last_cached_end)
            sel_forced = forced[sel]
            keep_cached = check_budget(plan, layer, n_cached, n_forced_cached, scores, sel_forced, sel_cached)
            extra = max(0, min(keep_cached - n_forced_cached, n_candidates))
            keep = choose(scores, sel_forced, sel_cached, extra, n_forced)  # [K] indices into sel
            n_candidates = extra
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
        flops += (q_flops + rest_flops) * rows.shape[0]
        work = work + rows.sum() + rows.shape[0]
        yield layer_rows[-1]
    logits = None
    if plan.need_logits:
        logits = fwd.logits(h[-1:])[0]
        flops += 2.0 * fwd.hidden_size * fwd.vocab_size
    captured = ChunkKV(torch.stack(captured_k), torch.stack(captured_v)) if plan.capture is not None else None
    return PrefillResult(
        logits=logits,
        rows=sel,
        layer_rows=layer_rows,
        matmul_flops=flops,
        attention_work=work,
        attention_flops_per_key=4.0 * fwd.n_heads * fwd.head_dim,
        captured=captured,
    )


def check_budget(plan: PrefillPlan, layer: int, n_cached: int, n_forced_cached: int, scores, forced, sel_cached) -> int:
    """Cached rows a check layer keeps (forced ones included): its ratio of the ``n_cached`` cached rows (a host
    count), or at the last check layer of a plan with a fidelity target, the rows whose scores reach it (that one
    reads the scores back: the only host read in the loop of a cacheblend plan). scores, forced, sel_cached: [M]
    over the rows computed at this layer."""
    if plan.budget is None or plan.budget.target is None or layer != max(plan.checks):
        return round(plan.checks[layer] * n_cached)
    candidates = sel_cached & ~forced
    return plan.budget.rows(scores[candidates], n_cached, n_forced_cached)
