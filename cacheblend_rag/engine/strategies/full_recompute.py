"""full_recompute: every row computed, nothing read from the store (the reference the others are measured by)."""

from __future__ import annotations

import torch

from ..plan import PlanReport, PrefillPlan
from ..transfer import upload
from .base import Strategy


class FullRecompute(Strategy):
    name = "full_recompute"

    def plan(self, runs, chunks, fwd, cache) -> PrefillPlan:
        ids = upload(torch.tensor([t for r in runs for t in r.token_ids], dtype=torch.long), fwd.device)  # [N]
        return PrefillPlan(ids=ids, report=PlanReport(strategy=self.name))
