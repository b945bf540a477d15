"""Shift correction of reused rows: move each chunk's stale KV by the mean change its recomputed rows saw.

A chunk's KV computed alone differs from its KV in the full prompt partly by a component its tokens share
(the context before the chunk shifts every token's hidden state alike). The recomputed rows of a chunk measure
that component at every layer: their fresh K (before RoPE) and V minus their stored K and V. Adding the mean of
that difference to the chunk's rows that are not recomputed removes the shared part of their error at the cost
of one pass over the cached rows per layer.
"""

from __future__ import annotations

import torch


def span_index(n: int, spans, device) -> tuple[torch.Tensor, int]:
    """[N] long: the index of the cached span holding each row, -1 for uncached rows; and the span count."""
    index = torch.full((n,), -1, dtype=torch.long, device=device)
    for i, span in enumerate(spans):
        index[span.start : span.end] = i
    return index, len(spans)


def shift_stale_rows(
    keys: torch.Tensor,
    values: torch.Tensor,
    sel: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    span_of_row: torch.Tensor,
    n_spans: int,
) -> None:
    """Add to every cached row outside ``sel`` the mean (fresh - stored) K and V of its span's rows in ``sel``.

    keys, values: [H, N, D] still holding the stored rows (K before RoPE); sel: [M] rows being computed;
    k_new, v_new: [H, M, D] their fresh K (before RoPE) and V; span_of_row: [N] long (-1 = uncached).
    Must run before the fresh rows overwrite the stored ones. Spans without a computed row are left as stored.
    """
    seg = span_of_row[sel]
    computed = seg >= 0
    if not bool(computed.any()):
        return
    seg, rows = seg[computed], sel[computed]
    h, _, d = keys.shape
    counts = torch.bincount(seg, minlength=n_spans).clamp_min(1).to(torch.float32)[None, :, None]
    stale = span_of_row >= 0
    stale[sel] = False
    stale_rows = stale.nonzero().squeeze(1)
    stale_span = span_of_row[stale_rows]
    for cache, fresh in ((keys, k_new), (values, v_new)):
        delta = fresh[:, computed].float() - cache[:, rows].float()  # [H, m, D]
        mean = torch.zeros(h, n_spans, d, device=keys.device).index_add_(1, seg, delta) / counts
        cache[:, stale_rows] += mean[:, stale_span].to(cache.dtype)
