"""cacheblend: every chunk's stored KV reused, and the cached rows its selection rule picks recomputed."""

from __future__ import annotations

from ..plan import PlanReport, PrefillPlan
from .base import Selection, Strategy
from .reuse import reuse_chunks


class CacheBlend(Strategy):
    """Reuses every chunk, then recomputes the cached rows ``selection`` picks (``recompute_ratio`` of them, or as
    many as a ``fidelity_target`` needs, within ``[min_ratio, max_ratio]``), plus the first
    ``recompute_chunk_head`` rows of every chunk."""

    name = "cacheblend"
    options = frozenset(
        {"recompute_ratio", "recompute_chunk_head", "fidelity_target", "min_ratio", "max_ratio", "selection"}
    )
    selects = True

    def __init__(self, config, selection: Selection) -> None:
        super().__init__(config)
        self.selection = selection

    @property
    def description(self) -> str:
        return f"strategy={self.name!r} with selection={self.selection.name!r}"

    def plan(self, runs, chunks, fwd, cache) -> PrefillPlan:
        self.selection.check_model(fwd)
        report = PlanReport(strategy=self.name, blend=True)
        reused = reuse_chunks(runs, chunks, self.config.recompute_chunk_head, report)
        return self.selection.plan(reused, fwd, cache)
