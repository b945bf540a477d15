"""Blend options: which strategy builds the prompt's KV cache, and how cacheblend picks tokens (the strategies and
selections that read them: engine/strategies/)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .kernels.backend import BACKENDS

STRATEGIES = ("full_recompute", "prefix_cache", "full_reuse", "cacheblend")
DEVIATIONS = ("v", "k")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class BlendConfig:
    """How a request's KV cache is assembled. Each option belongs to the strategy (or cacheblend selection) that
    reads it; giving one that the chosen strategy or selection ignores is a ValueError naming the fix.

    strategy: ``full_recompute`` (prefill everything), ``prefix_cache`` (reuse the exact cached prefix,
        compute the rest), ``full_reuse`` (reuse every cached chunk, compute only uncached text) or
        ``cacheblend`` (reuse every chunk, recompute the tokens its selection picks). engine/strategies/.
    recompute_ratio: fraction of the cached tokens cacheblend recomputes (after the last check layer).
    selection: how cacheblend picks the cached tokens to recompute. ``"query"`` (the default): a probe pass over the
        stored KV measures the attention the prompt's tail pays each cached token at every layer; the most-read
        tokens are recomputed through every layer (engine/strategies/query.py). ``"bridge"``: the same budget, half
        to the tokens the tail reads most, half to the tokens of other chunks that those read most (a pass more, over
        the first half; engine/strategies/bridge.py). ``"deviation"`` (the paper): the
        tokens whose K or V deviates most at the check layers. ``"attention"``: that deviation weighted by the
        attention the prompt's tail (e.g. the question) pays each token at the check layer
        (engine/strategies/deviation.py).
    check_layers: for the deviation and attention selections, the layers where the deviation is measured and the
        selection narrows (default ``(1,)``). More than one layer gives the paper's gradual filtering.
    check_ratios: for those selections, the ratio kept at each check layer (non-increasing, the last one is
        ``recompute_ratio``). Default: one layer -> ``(recompute_ratio,)``; k layers -> the ratio doubles for each
        earlier layer, capped at 1.
    deviation: for those selections, ``"v"`` (values, the paper's choice; the default) or ``"k"`` (keys before
        RoPE).
    fidelity_target: cacheblend only: instead of a fixed ratio, recompute per request the fewest cached tokens whose
        selection scores (attention share for ``"query"``, deviation otherwise) hold this fraction of the total,
        within ``[min_ratio, max_ratio]`` of the cached tokens; ``stats.recompute_ratio`` reports the ratio chosen.
        ``recompute_ratio`` is then unused. Needs a single check layer for the deviation selections.
    recompute_chunk_head: always recompute the first n tokens of every cached chunk (full_reuse and cacheblend;
        EPIC's observation that each chunk's first tokens acted as an attention sink when computed alone).
    exact_when_faster: cacheblend only: where the cost estimate (engine/cost.py: cached and uncached tokens, the probe
        pass) says a full prefill is about as fast as blending (a short prompt, few cached tokens), compute the prompt
        in full instead: the same speed, the exact answer; ``stats.fallback`` says why. False: always blend.
    guard_ratio: cacheblend with the query selection only: when the blend's first token differs from the one
        ``full_reuse`` gives (the probe pass computes full_reuse's distribution anyway), blending changed the answer
        and either may be wrong: the prefill is run again recomputing this share of the cached tokens (the rows the
        probe ranked highest; 1.0: every row, i.e. full recompute) before answering; ``stats.guard`` says it
        happened. None: never.
    backend: kernels to use: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    """

    strategy: str = "cacheblend"
    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] | None = None
    check_ratios: tuple[float, ...] | None = None
    deviation: str | None = None
    selection: str = "query"
    recompute_chunk_head: int = 0
    backend: str = "auto"
    fidelity_target: float | None = None
    min_ratio: float = 0.02
    max_ratio: float = 0.5
    exact_when_faster: bool = True
    guard_ratio: float | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.recompute_ratio) or not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be a number in [0, 1], got {self.recompute_ratio!r}")
        if self.check_layers is not None:
            layers = _int_tuple("check_layers", self.check_layers)
            if not layers:
                raise ValueError("check_layers must name at least one layer, e.g. check_layers=(1,)")
            if any(layer < 1 for layer in layers):
                raise ValueError(
                    f"check_layers must be >= 1 (layer 0's KV depends only on the token, so it never deviates); "
                    f"got {layers}"
                )
            if any(b <= a for a, b in itertools.pairwise(layers)):
                raise ValueError(f"check_layers must be strictly increasing, got {layers}")
            object.__setattr__(self, "check_layers", layers)
        if self.check_ratios is not None:
            ratios = _number_tuple("check_ratios", self.check_ratios)
            if any(not 0.0 <= r <= 1.0 for r in ratios):
                raise ValueError(f"every check ratio must be a number in [0, 1], got {ratios}")
            object.__setattr__(self, "check_ratios", ratios)
        if self.deviation is not None and self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be 'v' or 'k', got {self.deviation!r}")
        if (
            isinstance(self.recompute_chunk_head, bool)
            or not isinstance(self.recompute_chunk_head, int)
            or (self.recompute_chunk_head < 0)
        ):
            raise ValueError(f"recompute_chunk_head must be an int >= 0, got {self.recompute_chunk_head!r}")
        if self.fidelity_target is not None and (
            not _is_number(self.fidelity_target) or not 0.0 < self.fidelity_target <= 1.0
        ):
            raise ValueError(f"fidelity_target must be a number in (0, 1] or None, got {self.fidelity_target!r}")
        for name in ("min_ratio", "max_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not isinstance(self.exact_when_faster, bool):
            raise ValueError(f"exact_when_faster must be True or False, got {self.exact_when_faster!r}")
        if self.guard_ratio is not None and (not _is_number(self.guard_ratio) or not 0.0 < self.guard_ratio <= 1.0):
            raise ValueError(
                f"guard_ratio must be a number in (0, 1] (the share recomputed when the guard fires) or None, "
                f"got {self.guard_ratio!r}"
            )
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio ({self.min_ratio}) must not exceed max_ratio ({self.max_ratio})")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        # the strategy and selection named, and whether they read every option given (engine/strategies/)
        from .engine.strategies import strategy_for

        strategy_for(self)

    def replace(self, **changes: object) -> BlendConfig:
        """A copy with some fields changed (validated again)."""
        fields = {
            "strategy": self.strategy,
            "recompute_ratio": self.recompute_ratio,
            "check_layers": self.check_layers,
            "check_ratios": self.check_ratios,
            "deviation": self.deviation,
            "selection": self.selection,
            "recompute_chunk_head": self.recompute_chunk_head,
            "backend": self.backend,
            "fidelity_target": self.fidelity_target,
            "min_ratio": self.min_ratio,
            "max_ratio": self.max_ratio,
            "exact_when_faster": self.exact_when_faster,
            "guard_ratio": self.guard_ratio,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"BlendConfig has no field(s) {sorted(unknown)}; fields are {sorted(fields)}")
        fields.update(changes)
        return BlendConfig(**fields)  # type: ignore[arg-type]


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, int) for x in items):
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}")
    return items


def _number_tuple(name: str, value: object) -> tuple[float, ...]:
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if any(not _is_number(x) for x in items):
        raise ValueError(f"every check ratio must be a number in [0, 1], got {items}")
    return items
