"""The check-layer selections: ``deviation`` (the paper: the cached rows whose fresh K or V deviates most from the
stored one at the check layers) and ``attention`` (that deviation weighted by the attention the prompt's tail pays
each row). Both score inside the layer loop (``CheckScorer``): the plan holds the selection itself."""

from __future__ import annotations

import itertools
import math

import torch

from ..plan import PrefillPlan
from ..selection import Budget, attention_mass, deviation_scores, probe_span
from .base import Selection
from .reuse import ReusedChunks

DEFAULT_CHECK_LAYERS = (1,)
DEFAULT_DEVIATION = "v"


def check_ratios(layers: tuple[int, ...], ratios, recompute_ratio: float) -> tuple[float, ...]:
    """The ratio kept at each check layer: ``ratios`` checked against ``layers`` (one each, non-increasing, the last
    one ``recompute_ratio``), or by default one layer -> ``(recompute_ratio,)`` and k layers -> the ratio doubling
    for each earlier layer, capped at 1."""
    if ratios is None:
        n = len(layers)
        return tuple(min(1.0, recompute_ratio * 2 ** (n - 1 - i)) for i in range(n))
    ratios = tuple(ratios)
    if len(ratios) != len(layers):
        raise ValueError(
            f"check_ratios needs one ratio per check layer: {len(layers)} layers {layers}, "
            f"got {len(ratios)} ratios {ratios}"
        )
    if any(b > a for a, b in itertools.pairwise(ratios)):  # each one in [0, 1]: BlendConfig checked
        raise ValueError(f"check_ratios must not increase from one check layer to the next, got {ratios}")
    if not math.isclose(ratios[-1], recompute_ratio):
        raise ValueError(
            f"the last check ratio is the recompute ratio: got check_ratios={ratios} with "
            f"recompute_ratio={recompute_ratio}; make them equal"
        )
    return ratios


class DeviationSelection(Selection):
    """At each check layer (``check_layers``, default (1,)) keep the cached rows whose fresh V (or K before RoPE,
    ``deviation="k"``) deviates most from the stored one: ``check_ratios`` of them, the last one the recompute
    ratio (or, with a fidelity target and one check layer, as many as the target needs)."""

    name = "deviation"
    options = frozenset({"check_layers", "check_ratios", "deviation"})

    def __init__(self, config) -> None:
        super().__init__(config)
        self.layers = config.check_layers if config.check_layers is not None else DEFAULT_CHECK_LAYERS
        self.deviation = config.deviation if config.deviation is not None else DEFAULT_DEVIATION
        self.ratios = check_ratios(self.layers, config.check_ratios, config.recompute_ratio)
        if config.fidelity_target is not None and len(self.layers) > 1:
            raise ValueError(
                f"fidelity_target with selection={self.name!r} needs one check layer, got {self.layers}; "
                "pass check_layers=(1,) or use selection='query'"
            )
        self.budget = Budget.of(config)

    def check_model(self, fwd) -> None:
        too_deep = [layer for layer in self.layers if layer >= fwd.n_layers]
        if too_deep:
            raise ValueError(f"check_layers {too_deep} do not exist: the model has {fwd.n_layers} layers")

    def plan(self, reused: ReusedChunks, fwd, cache) -> PrefillPlan:
        return PrefillPlan(
            ids=reused.ids,
            spans=reused.spans,
            forced=reused.forced,
            n_forced=reused.n_forced,
            checks=dict(zip(self.layers, self.ratios)),
            scorer=self,
            budget=self.budget,
            report=reused.report,
            exact=reused.exact,
            capture=reused.capture,
        )

    def score(self, sel, k_new, v_new, keys, values, sel_cached, kernels) -> torch.Tensor:
        """[M] squared deviation of each computed row's fresh K or V from the stored one (-inf if uncached)."""
        return deviation_scores(self.deviation, sel, k_new, v_new, keys, values, sel_cached, kernels)

    def weigh(self, layer, scores, x, sel, keys, fwd, n, tail_start) -> torch.Tensor:
        return scores


class AttentionSelection(DeviationSelection):
    """The deviation, times the attention the prompt's tail (the uncached rows after the last chunk: the question)
    pays each row at the check layer: a row that deviates but is never read matters less."""

    name = "attention"

    def weigh(self, layer, scores, x, sel, keys, fwd, n, tail_start) -> torch.Tensor:
        """x: [M, hidden] the check layer's normalised input of the rows ``sel``: [M]; keys: [Hkv, N, D] rotated."""
        a, b = probe_span(sel.shape[0], n, tail_start)  # [P] = sel[a:b], found on the host
        q_probe = fwd.project_q(layer, x[a:b], sel[a:b])  # [Hq, P, D]
        return scores * attention_mass(q_probe, sel[a:b], keys, fwd.scale)[sel]
