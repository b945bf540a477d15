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

from ..kernels import Kernels

MAX_PROBES = 256  # tail rows whose attention is measured (bounds the [heads, probes, N] scores)


def deviation_scores(deviation: str, sel, k_new, v_new, keys, values, sel_cached, kernels: Kernels) -> torch.Tensor:
    """Per computed row: squared K or V deviation from the stored rows, -inf for uncached rows.

    sel: [M] rows; k_new, v_new: [Hkv, M, D] fresh (K before RoPE); keys, values: [Hkv, N, D] holding the stored
    rows (K before RoPE); sel_cached: [M] bool. Must run before the fresh rows overwrite the stored ones.
    """
    fresh, stored = (v_new, values) if deviation == "v" else (k_new, keys)
    return kernels.deviation(fresh, stored, sel_cached, rows=sel)


def query_attention(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query's attention probabilities over the keys, summed over the heads.

    q: [Hq, P, D] rotated queries at positions q_pos: [P]; keys: [Hkv, N, D] rotated, key j at position j.
    Returns [P, N] float32 (each row sums to the number of heads)."""
    hq, p, d = q.shape
    hkv, n, _ = keys.shape
    qg = q.float().reshape(hkv, (hq // hkv) * p, d)
    scores = (qg @ keys.float().transpose(1, 2)) * scale  # [Hkv, G*P, N]
    hidden = torch.arange(n, device=q.device)[None, :] > q_pos[:, None]  # [P, N]
    scores = scores.view(hkv, hq // hkv, p, n).masked_fill_(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=(0, 1))


def attention_mass(q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probability each key receives, summed over heads and queries.

    q: [Hq, P, D] rotated probe queries at positions q_pos: [P]; keys: [Hkv, N, D] rotated, key j at position j.
    Returns [N] float32.
    """
    return query_attention(q, q_pos, keys, scale).sum(dim=0)


def cross_chunk_shares(
    q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, scale: float, chunk_of: torch.Tensor
) -> torch.Tensor:
    """Per key, the share of each query's attention to the cached keys of other chunks than the query's own that the
    key gets (attention summed over heads, then normalised per query), summed over the queries.

    q: [Hq, P, D] rotated queries at positions q_pos: [P] (row j at position j); keys: [Hkv, N, D] rotated;
    chunk_of: [N] int64, each row's chunk (-1: not cached). Returns [N] float32 (0 on uncached rows and on each
    query's own chunk)."""
    mass = query_attention(q, q_pos, keys, scale)  # [P, N]
    other = (chunk_of[None, :] >= 0) & (chunk_of[None, :] != chunk_of[q_pos][:, None])  # [P, N]
    mass = mass * other
    return (mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30)).sum(dim=0)


def probe_span(m: int, n: int, last_cached_end: int) -> tuple[int, int]:
    """Where, among the ``m`` sorted rows computed at a check layer, the probe rows are: the uncached rows after the
    last cached chunk (at most MAX_PROBES, the last ones), or the last row if there are none. Those rows are always
    computed (they are forced), so they are the last ``n - last_cached_end`` of the sorted rows: (start, end)
    indices into them, found on the host."""
    tail = min(n - last_cached_end, MAX_PROBES)
    return (m - tail, m) if tail > 0 else (m - 1, m)


def mask_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the True entries of ``mask`` ([M] bool), of which the caller knows there are ``count``:
    like ``mask.nonzero()`` but sized on the host, so the device is never waited for. -> [count] int64."""
    return torch.sort(mask.to(torch.uint8), descending=True, stable=True).indices[:count]


def choose(
    scores: torch.Tensor, forced: torch.Tensor, sel_cached: torch.Tensor, extra: int, n_forced: int
) -> torch.Tensor:
    """Rows to keep: the ``n_forced`` forced rows plus the ``extra`` highest-scoring cached rows that are not forced
    (the caller makes sure there are that many). scores, forced, sel_cached: [M] -> sorted indices [n_forced +
    extra]. Counts come from the plan on the host; nothing is read from the device."""
    keep = forced.clone()
    if extra > 0:
        scores = scores.masked_fill(forced | ~sel_cached, float("-inf"))
        keep.index_fill_(0, scores.topk(extra, sorted=False).indices, True)
    return mask_rows(keep, n_forced + extra)


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
