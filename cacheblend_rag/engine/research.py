"""A small research API for experiments on which cached rows to recompute (``benchmarks/``), over the public engine.

- ``reused_prompt(engine, ...)``: a request's prompt with its chunks' stored KV, placed as ``full_reuse`` and
  ``cacheblend`` read them (a ``ReusedPrompt``: token ids, spans, which rows are cached, each row's offset in its
  chunk).
- ``ReusedPrompt.plan(recompute)``: a plan that reuses every chunk but recomputes a given set of cached rows through
  every layer (with the uncached rows and the last row); ``ReusedPrompt.full_plan()``: full recompute, optionally
  capturing every row's K/V. Both take an ``observe(layer, q, rows, keys)`` callback (``attention_mass`` turns its
  arguments into the attention each key receives).
- ``run_plan(engine, plan)``: the prefill of a plan into a fresh cache, or on an earlier run's (a ``PlanRun``: its
  logits, captured K/V, ``decode(token)``).
- ``teacher_force(run, targets)``: score a selection: log-probs along a reference answer after a ``PlanRun`` or a
  ``PreparedRequest`` (``engine.prepare``), e.g. to compare with full recompute's by KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.forward import ModelForward
from ..store import ChunkHandle, ChunkKV, LazyChunk
from .chunk_reads import RequestChunks
from .chunk_source import kv_rows
from .decode import decode_step
from .kv_cache import KVCache
from .plan import CachedSpan, PrefillPlan
from .prefill import PrefillResult, prefill
from .selection import attention_mass
from .transfer import upload

__all__ = ["PlanRun", "ReusedPrompt", "attention_mass", "reused_prompt", "run_plan", "teacher_force"]


@dataclass(frozen=True, eq=False)
class ReusedPrompt:
    """ids: [N] token ids (on the model's device); spans: the reused chunks' rows, each a ChunkKV [L, Hkv, T, D]
    (keys before RoPE); cached: [N] bool (host), the rows that come from a span; offsets: [N] int64 (host), each
    cached row's index in its chunk's stored KV (-1 elsewhere)."""

    ids: torch.Tensor
    spans: tuple[CachedSpan, ...]
    cached: torch.Tensor
    offsets: torch.Tensor

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def rows(self) -> torch.Tensor:
        """[C] the cached rows, sorted (host)."""
        return self.cached.nonzero().squeeze(1)

    @property
    def tail_start(self) -> int:
        """The first row after the last chunk (the question and what follows it)."""
        return max((span.end for span in self.spans), default=0)

    def plan(self, recompute: torch.Tensor | None = None, *, kvs=None, observe=None) -> PrefillPlan:
        """Reuse every chunk's stored KV (or ``kvs``: one ChunkKV per span, in its place) but recompute, through every
        layer, the rows in ``recompute`` ([R] int64 host indices of cached rows; None: none, i.e. full_reuse), the
        uncached rows and the last row."""
        forced = ~self.cached  # [N] bool: the rows computed through every layer
        forced[self.n - 1] = True
        if recompute is not None:
            forced[recompute] = True
        spans = self.spans
        if kvs is not None:
            spans = tuple(CachedSpan(span.start, kv) for span, kv in zip(self.spans, kvs, strict=True))
        counts = (int(forced.sum()), int((forced & self.cached).sum()))
        device = self.ids.device
        initial = upload(forced.nonzero().squeeze(1), device)
        return PrefillPlan(
            ids=self.ids, spans=spans, initial=initial, forced=upload(forced, device), n_forced=counts, observe=observe
        )

    def full_plan(self, *, capture: bool = False, observe=None) -> PrefillPlan:
        """Full recompute of the prompt; ``capture``: return every row's K (before RoPE) and V ([L, Hkv, N, D])."""
        return PrefillPlan(ids=self.ids, capture=(0, self.n) if capture else None, observe=observe)


def reused_prompt(
    engine,
    segments: list[str | ChunkHandle] | None = None,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    scope: str | None = None,
) -> ReusedPrompt:
    """The prompt of a request (segments, a prompt string or chat messages, as ``engine.generate`` takes them) with
    the stored KV of the chunks the engine would reuse where they stand, read in full (a miss is computed)."""
    chunks = RequestChunks(engine.chunk_source, engine.model_forward, scope)
    runs, _, _ = chunks.place(engine.blocks(segments, prompt, messages=messages, scope=scope))
    reused = [r for r in runs if r.handle is not None]
    kvs, _, _ = chunks.fetch([r.handle for r in reused])
    n = runs[-1].end
    cached = torch.zeros(n, dtype=torch.bool)
    offsets = torch.full((n,), -1, dtype=torch.long)
    spans = []
    for run, kv in zip(reused, kvs):
        whole = kv.wait() if isinstance(kv, LazyChunk) else kv
        spans.append(CachedSpan(run.start, kv_rows(whole, run.offset, len(run.token_ids))))
        cached[run.start : run.end] = True
        offsets[run.start : run.end] = torch.arange(len(run.token_ids))
    ids = upload(torch.tensor([t for r in runs for t in r.token_ids], dtype=torch.long), engine.device)
    return ReusedPrompt(ids, tuple(spans), cached, offsets)


@dataclass
class PlanRun:
    """A plan's prefill: ``result`` (logits, rows per layer, captured K/V), the cache it filled (room for
    ``decode``), and the forward it ran on."""

    result: PrefillResult
    cache: KVCache
    fwd: ModelForward
    prompt_length: int

    @property
    def logits(self) -> torch.Tensor:
        """[vocab] float32: the first new token's."""
        return self.result.logits

    @property
    def captured(self) -> ChunkKV | None:
        return self.result.captured

    def decode(self, token: int) -> torch.Tensor:
        """Append ``token``; the next token's logits [vocab] float32."""
        with torch.inference_mode():
            return decode_step(self.fwd, self.cache, token)


def run_plan(
    engine, plan: PrefillPlan, extra_capacity: int = 0, backend: str | None = None, on: PlanRun | None = None
) -> PlanRun:
    """Run ``plan`` on ``engine``'s model (kernels of ``backend``, default the engine's) into a new cache with room
    for ``extra_capacity`` decoded tokens, or into the cache of the earlier run ``on`` (a ``cache_ready`` plan then
    computes its rows on the K/V that run left)."""
    fwd = engine.model_forward.with_backend(backend or engine.default_config.backend)
    cache = on.cache if on is not None else KVCache.for_model(fwd, plan.n + extra_capacity)
    with torch.inference_mode():
        result = prefill(fwd, plan, cache)
    return PlanRun(result, cache, fwd, plan.n)


def teacher_force(run, targets: list[int]) -> torch.Tensor:
    """Log-probs [T, V] (float32) of the next token at each of the T ``targets`` positions after the prompt: the first
    from the prefill's logits, then one decoding step per target but the last (the cache is rewound to the prompt's
    end first). ``run``: a PlanRun, or the PreparedRequest of ``engine.prepare(..., extra_capacity=T)``."""
    length = run.prompt_length if isinstance(run, PlanRun) else len(run.prompt_ids)
    run.cache.truncate(length)
    steps = [run.logits] + [run.decode(token) for token in targets[:-1]]
    return torch.log_softmax(torch.stack(steps).float(), dim=-1)
