"""cacheblend: every chunk's stored KV reused, and the cached rows its selection rule picks recomputed."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace

import torch

from ..cost import CostModel, ModelShape
from ..plan import PlanReport, PrefillPlan
from ..prefill import run_to_end
from ..transfer import upload
from .base import Selection, Strategy
from .reuse import reuse_chunks, store_head


class CacheBlend(Strategy):
    """Reuses every chunk, then recomputes the cached rows ``selection`` picks (``recompute_ratio`` of them, or as
    many as a ``fidelity_target`` needs, within ``[min_ratio, max_ratio]``), plus the first
    ``recompute_chunk_head`` rows of every chunk."""

    name = "cacheblend"
    options = frozenset(
        {
            "recompute_ratio",
            "recompute_chunk_head",
            "fidelity_target",
            "min_ratio",
            "max_ratio",
            "selection",
            "exact_when_faster",
        }
    )
    selects = True

    def __init__(self, config, selection: Selection) -> None:
        super().__init__(config)
        self.selection = selection

    @property
    def description(self) -> str:
        return f"strategy={self.name!r} with selection={self.selection.name!r}"

    cost = CostModel()

    def plan(self, runs, chunks, fwd, cache) -> PrefillPlan:
        return run_to_end(self.plan_steps(runs, chunks, fwd, cache))

    def plan_steps(self, runs, chunks, fwd, cache) -> Generator[int, None, PrefillPlan]:
        """Place and read the chunks (in the first step), then the selection's steps (its probe pass, if any)."""
        self.selection.check_model(fwd)
        report = PlanReport(strategy=self.name, blend=True)
        placement = chunks.place(runs)
        exact = self.exact_reason(placement[0], fwd)
        if exact is not None:  # blending cannot win here: the exact path, as fast
            placed = placement[0]
            ids = upload(torch.tensor([t for r in placed for t in r.token_ids], dtype=torch.long), fwd.device)  # [N]
            return PrefillPlan(ids=ids, report=PlanReport(strategy=self.name, unplaced=placement[1], fallback=exact))
        reused = reuse_chunks(runs, chunks, self.config.recompute_chunk_head, report, placement)
        return (yield from self.selection.plan_steps(reused, fwd, cache))

    def review(self, plan: PrefillPlan, result) -> PrefillPlan | None:
        """The selection's guard on the blend's answer, if it has one."""
        return self.selection.review(plan, result)

    def finish(self, plan: PrefillPlan, result, store) -> None:
        """Store the prompt's head if this request computed it (its first pass captured it)."""
        store_head(plan, result, store)

    def exact_reason(self, runs, fwd) -> str | None:
        """Why the prompt of placed ``runs`` is computed in full instead (blending would be no faster), or None."""
        config = self.config
        if not config.exact_when_faster or self.selection.name not in ("query", "bridge"):  # rules the model knows
            return None
        spans = [(r.start, r.end) for r in runs if r.handle is not None]
        if not spans:
            return None
        ratio = config.recompute_ratio if config.fidelity_target is None else config.min_ratio
        ratio = max(ratio, config.recompute_chunk_head * len(spans) / sum(b - a for a, b in spans))
        shape = ModelShape.of(fwd)
        estimate = self.cost.estimate(shape, runs[-1].end, spans, ratio, probe=True)
        if self.selection.name == "bridge":  # its hop pass: a pass's own cost (its rows are counted in ``ratio``)
            estimate = replace(estimate, blend=estimate.blend + self.cost.pass_cost(shape, 0, 0, 0))
        return None if estimate.blend_wins else estimate.reason
