"""Which cached tokens cacheblend recomputes: scores at a check layer and the top-k choice.

``deviation`` (the paper): the squared difference between a token's fresh and stored K or V.
``attention``: that deviation weighted by the attention the prompt's tail (the question and the template
after the last chunk) pays to the token at the check layer. A stale value v changes the output of a query
by roughly ``attention * (v_fresh - v_stored)``, so a token that deviates but is never attended to matters
less than one that deviates a little and is read a lot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import Kernels, select_top

MAX_PROBES = 256  # tail rows whose attention is measured (bounds the [heads, probes, N] scores)


def deviation_scores(deviation: str, sel, k_new, v_new, keys, values, sel_cached, kernels: Kernels) -> torch.Tensor:
    """Per computed row: squared K or V deviation from the stored rows, -inf for uncached rows.

    sel: [M] rows; k_new, v_new: [Hkv, M, D] fresh (K before RoPE); keys, values: [Hkv, N, D] holding the stored
    rows (K before RoPE); sel_cached: [M] bool. Must run before the fresh rows overwrite the stored ones.
    """
    fresh, stored = (v_new, values) if deviation == "v" else (k_new, keys)
    return kernels.deviation(fresh, stored, sel_cached, rows=sel)


def attention_mass(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probability each key receives, summed over heads and queries.

    q: [Hq, P, D] rotated probe queries at positions q_pos: [P]; keys: [Hkv, N, D] rotated, key j at position j.
    Returns [N] float32.
    """
    hq, p, d = q.shape
    hkv, n, _ = keys.shape
    qg = q.float().reshape(hkv, (hq // hkv) * p, d)
    scores = (qg @ keys.float().transpose(1, 2)) * scale  # [Hkv, G*P, N]
    hidden = torch.arange(n, device=q.device)[None, :] > q_pos[:, None]  # [P, N]
    scores = scores.view(hkv, hq // hkv, p, n).masked_fill_(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=(0, 1, 2))


def probe_rows(sel: torch.Tensor, sel_cached: torch.Tensor, last_cached_end: int) -> torch.Tensor:
    """Indices into ``sel`` of the uncached rows after the last cached chunk (at most MAX_PROBES, the last ones);
    the last row if there are none. sel: [M]; sel_cached: [M] bool."""
    tail = (~sel_cached & (sel >= last_cached_end)).nonzero().squeeze(1)
    if tail.numel() == 0:
        return torch.tensor([sel.shape[0] - 1], device=sel.device)
    return tail[-MAX_PROBES:]


def choose(scores: torch.Tensor, forced: torch.Tensor, sel_cached: torch.Tensor, budget: int) -> torch.Tensor:
    """Rows to keep: every forced row plus the ``budget`` highest-scoring cached rows (budget counts the forced
    cached rows too). scores, forced, sel_cached: [M] -> sorted indices [K]."""
    keep = forced.clone()
    scores = scores.masked_fill(keep | ~sel_cached, float("-inf"))
    extra = budget - int((keep & sel_cached).sum())
    keep[select_top(scores, extra)] = True
    return keep.nonzero().squeeze(1)


@dataclass(frozen=True)
class Budget:
    """How many cached rows a selection keeps: ``ratio`` of the cached rows, or, with ``target`` set, the fewest
    whose scores hold that share of the candidates' total, within [min_ratio, max_ratio] of the cached rows."""

    ratio: float
    target: float | None = None
    min_ratio: float = 0.0
    max_ratio: float = 1.0

    @classmethod
    def of(cls, config) -> Budget:
        return cls(config.recompute_ratio, config.fidelity_target, config.min_ratio, config.max_ratio)

    def rows(self, scores: torch.Tensor, n_cached: int, n_forced_cached: int) -> int:
        """Cached rows to keep, counting the forced ones; scores: [C] of the candidate (unforced cached) rows."""
        if self.target is None:
            return round(self.ratio * n_cached)
        ranked = scores.float().clamp_min(0).sort(descending=True).values
        share = ranked.cumsum(0) / ranked.sum().clamp_min(1e-30)
        total = n_forced_cached + min(int((share < self.target).sum()) + 1, ranked.numel())
        return min(max(total, round(self.min_ratio * n_cached)), round(self.max_ratio * n_cached))
