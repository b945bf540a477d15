"""What a prefill runs: a ``PrefillPlan``, built once by a strategy (``engine/strategies/``) and never changed.

A plan says which prompt rows have stored KV (``spans``), which rows are computed from layer 0 (``initial``), which
rows a check layer must keep (``forced``), at which layers the computed rows narrow and how the cached ones are
scored there (``checks``, ``scorer``). Its ``report`` carries what the request's stats need besides the prefill's
own result (``engine/stats.py``: ``request_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

from ..model.forward import ModelForward
from ..store.chunk import ChunkKV


@dataclass(frozen=True, eq=False)
class CachedSpan:
    """Prompt rows start..start+T-1 take their KV from ``kv`` ([L, Hkv, T, D], keys before RoPE): a ChunkKV, or a
    block still arriving layer by layer (``layer(l)``, ``n_tokens``)."""

    start: int
    kv: ChunkKV | Any

    @property
    def end(self) -> int:
        return self.start + self.kv.n_tokens


class CheckScorer(Protocol):
    """How a check layer scores the rows it computed (a cacheblend selection: ``engine/strategies/deviation.py``).

    ``score`` runs before the fresh K/V overwrite the stored rows; ``weigh`` after every key is rotated."""

    def score(self, sel, k_new, v_new, keys, values, sel_cached, kernels) -> torch.Tensor:
        """sel: [M] rows; k_new, v_new: [Hkv, M, D] fresh (K before RoPE); keys, values: [Hkv, N, D] holding the
        stored rows; sel_cached: [M] bool -> [M] float32 scores (higher: recompute first)."""
        ...

    def weigh(
        self, layer: int, scores: torch.Tensor, x, sel, keys, fwd: ModelForward, n: int, tail_start: int
    ) -> torch.Tensor:
        """scores: [M]; x: [M, hidden] the layer's normalised input; keys: [Hkv, N, D] rotated; tail_start: the
        end of the last cached span -> [M] final scores."""
        ...


@dataclass(frozen=True)
class PlanReport:
    """What a plan knows for the request's stats: the strategy, chunk hits and misses, chunks computed because of
    where they stand (``unplaced``, ``fallback``), whether the cached share recomputed is reported (``blend``),
    the query selection's probe pass (its result, for its FLOPs), and the time spent reading chunks and probing;
    when a guard ran the prefill again (``guard``: why), ``rejected`` is the result of the pass it set aside."""

    strategy: str = "custom"
    hits: int = 0
    misses: int = 0
    unplaced: int = 0
    fallback: str | None = None
    blend: bool = False
    probe: Any = None  # PrefillResult of a probe pass, or None
    hop: Any = None  # PrefillResult of the bridge selection's hop pass, or None
    guard: str | None = None
    rejected: Any = None  # PrefillResult of the prefill a guard ran again, or None
    load_s: float = 0.0
    probe_s: float = 0.0
    kept: int = 0  # rows an earlier pass computed that the prefill proper keeps (the prompt's head; hop 1 of a bridge)
    exact: int = 0  # rows whose exact K/V was read from the store (the prompt's head, stored by an earlier request)
    head_key: str | None = None  # where to store the prompt's head after the prefill (its first pass captures it)


@dataclass(frozen=True, eq=False)
class PrefillPlan:
    """ids: [N] token ids. spans: the cached rows. initial: [M0] sorted rows computed from layer 0 (None: all).
    forced: [N] bool, rows a check layer must keep (every uncached row among them); n_forced: (forced rows, forced
    rows that are cached), the strategy's host counts. checks: layer -> ratio of the cached rows kept there, scored
    by ``scorer``; budget: with a fidelity target, how many rows the last check layer keeps. capture: rows whose
    pre-RoPE K and V to return (``store_after``: which of them the strategy stores, under which keys).
    cache_ready: the cache already holds every span's rotated K/V (a probe pass wrote them): only the computed rows
    are rotated and written. observe(layer, q, rows, keys): called at every layer with the rotated queries of the
    rows it computes. exact: spans whose stored K/V is what computing them would give (the prompt's head): placed
    like ``spans`` but not cached rows (never scored or recomputed; a plan's ``initial`` leaves them out)."""

    ids: torch.Tensor
    spans: tuple[CachedSpan, ...] = ()
    initial: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    n_forced: tuple[int, int] | None = None
    checks: Mapping[int, float] = field(default_factory=dict)
    scorer: CheckScorer | None = None
    budget: Any = None  # selection.Budget
    capture: tuple[int, int] | None = None
    store_after: tuple[tuple[str, int, int], ...] = ()  # captured rows its strategy stores: (key, start, end)
    need_logits: bool = True
    cache_ready: bool = False
    observe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    report: PlanReport = PlanReport()
    exact: tuple[CachedSpan, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", tuple(self.spans))
        object.__setattr__(self, "exact", tuple(self.exact))
        object.__setattr__(self, "checks", MappingProxyType(dict(self.checks)))
        if self.checks and self.scorer is None:
            raise ValueError("a plan with check layers needs a scorer (the selection that scores the rows)")

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    @property
    def n_cached(self) -> int:
        return sum(span.kv.n_tokens for span in self.spans)

    def forced_counts(self, from_cache: torch.Tensor) -> tuple[int, int]:
        """(forced rows, forced rows that are cached): the strategy's host counts, or (for a hand-made plan without
        them) counted on the device, once, before the loop."""
        if self.n_forced is not None:
            return self.n_forced
        if self.forced is None:
            return self.n - self.n_cached, 0
        return int(self.forced.sum()), int((self.forced & from_cache).sum())

    def check_spans(self) -> None:
        """Host-side validation of the spans, once per request: inside the prompt, in order, not overlapping."""
        end = 0
        for span in sorted((*self.exact, *self.spans), key=lambda span: span.start):
            if span.start < end or span.end > self.n or span.kv.n_tokens <= 0:
                raise ValueError(f"cached spans must be ordered, non-empty and inside the {self.n} prompt rows")
            end = span.end
