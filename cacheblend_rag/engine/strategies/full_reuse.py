"""full_reuse: every chunk's stored KV as it is; only the uncached rows (and forced chunk heads) are computed."""

from __future__ import annotations

from ..plan import PlanReport, PrefillPlan
from .base import Strategy
from .reuse import reuse_chunks, store_head


class FullReuse(Strategy):
    name = "full_reuse"
    options = frozenset({"recompute_chunk_head"})

    def plan(self, runs, chunks, fwd, cache) -> PrefillPlan:
        reused = reuse_chunks(runs, chunks, self.config.recompute_chunk_head, PlanReport(strategy=self.name))
        return PrefillPlan(
            ids=reused.ids,
            spans=reused.spans,
            initial=reused.forced_rows,
            forced=reused.forced,
            n_forced=reused.n_forced,
            report=reused.report,
            exact=reused.exact,
            capture=reused.capture,
        )

    def finish(self, plan, result, store) -> None:
        store_head(plan, result, store)
