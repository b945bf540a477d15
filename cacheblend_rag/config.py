"""Blend options: which strategy builds the prompt's KV cache, and how cacheblend picks tokens."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .kernels.backend import BACKENDS

STRATEGIES = ("full_recompute", "prefix_cache", "full_reuse", "cacheblend")
DEVIATIONS = ("v", "k")
SELECTIONS = ("deviation", "attention", "query")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class BlendConfig:
    """How a request's KV cache is assembled.

    strategy: ``full_recompute`` (prefill everything), ``prefix_cache`` (reuse the exact cached prefix,
        compute the rest), ``full_reuse`` (reuse every cached chunk, compute only uncached text) or
        ``cacheblend`` (reuse every chunk, recompute the tokens whose KV deviates most).
    recompute_ratio: fraction of the cached tokens cacheblend recomputes after the last check layer.
    check_layers: layers where cacheblend measures the deviation and narrows the selection. More than
        one layer gives the paper's gradual filtering.
    check_ratios: the ratio kept at each check layer (non-increasing, the last one is
        ``recompute_ratio``). Default: one layer -> ``(recompute_ratio,)``; k layers -> the ratio
        doubles for each earlier layer, capped at 1.
    deviation: ``"v"`` (values, the paper's choice) or ``"k"`` (keys before RoPE).
    selection: how cacheblend picks the cached tokens to recompute. ``"deviation"`` (the paper): the tokens
        whose K or V deviates most at the check layers. ``"attention"``: that deviation weighted by the attention
        the prompt's tail (e.g. the question) pays each token at the check layer (engine/selection.py).
        ``"query"``: a probe pass over the stored KV measures the attention the tail pays each cached token at
        every layer; the most-read tokens are recomputed through every layer (engine/query_selection.py;
        ``check_layers`` and ``deviation`` do not apply).
    fidelity_target: instead of a fixed ratio, recompute per request the fewest cached tokens whose selection
        scores (attention share for ``"query"``, deviation otherwise) hold this fraction of the total, within
        ``[min_ratio, max_ratio]`` of the cached tokens; ``stats.recompute_ratio`` reports the ratio chosen.
        ``recompute_ratio`` is then unused. Needs a single check layer for the deviation selections.
    recompute_chunk_head: always recompute the first n tokens of every cached chunk (EPIC's
        observation that each chunk's first tokens acted as an attention sink when computed alone).
    backend: kernels to use: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    """

    strategy: str = "cacheblend"
    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    check_ratios: tuple[float, ...] | None = None
    deviation: str = "v"
    selection: str = "query"
    recompute_chunk_head: int = 0
    backend: str = "auto"
    fidelity_target: float | None = None
    min_ratio: float = 0.02
    max_ratio: float = 0.5
    _ratios: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if not _is_number(self.recompute_ratio) or not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be a number in [0, 1], got {self.recompute_ratio!r}")
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
        ratios = self._resolve_ratios(layers)
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be 'v' or 'k', got {self.deviation!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}; got {self.selection!r}")
        if (
            isinstance(self.recompute_chunk_head, bool)
            or not isinstance(self.recompute_chunk_head, int)
            or (self.recompute_chunk_head < 0)
        ):
            raise ValueError(f"recompute_chunk_head must be an int >= 0, got {self.recompute_chunk_head!r}")
        if self.fidelity_target is not None:
            if not _is_number(self.fidelity_target) or not 0.0 < self.fidelity_target <= 1.0:
                raise ValueError(f"fidelity_target must be a number in (0, 1] or None, got {self.fidelity_target!r}")
            if self.selection != "query" and len(layers) > 1:
                raise ValueError(
                    f"fidelity_target with selection={self.selection!r} needs one check layer, got {layers}; "
                    "pass check_layers=(1,) or use selection='query'"
                )
        for name in ("min_ratio", "max_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio ({self.min_ratio}) must not exceed max_ratio ({self.max_ratio})")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        object.__setattr__(self, "check_layers", layers)
        object.__setattr__(self, "_ratios", ratios)

    def _resolve_ratios(self, layers: tuple[int, ...]) -> tuple[float, ...]:
        if self.check_ratios is None:
            n = len(layers)
            return tuple(min(1.0, self.recompute_ratio * 2 ** (n - 1 - i)) for i in range(n))
        ratios = tuple(self.check_ratios)
        if len(ratios) != len(layers):
            raise ValueError(
                f"check_ratios needs one ratio per check layer: {len(layers)} layers {layers}, "
                f"got {len(ratios)} ratios {ratios}"
            )
        if any(not _is_number(r) or not 0.0 <= r <= 1.0 for r in ratios):
            raise ValueError(f"every check ratio must be a number in [0, 1], got {ratios}")
        if any(b > a for a, b in itertools.pairwise(ratios)):
            raise ValueError(f"check_ratios must not increase from one check layer to the next, got {ratios}")
        if not math.isclose(ratios[-1], self.recompute_ratio):
            raise ValueError(
                f"the last check ratio is the recompute ratio: got check_ratios={ratios} with "
                f"recompute_ratio={self.recompute_ratio}; make them equal"
            )
        return ratios

    @property
    def ratios(self) -> tuple[float, ...]:
        """The ratio kept at each check layer, in the order of ``check_layers``."""
        return self._ratios

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
