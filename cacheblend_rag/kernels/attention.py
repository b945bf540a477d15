"""Attention for a subset of query tokens, each at its own absolute position, over the full fused K/V.

Key j sits at absolute position j (the fused cache is ordered by position). A query at position p sees
keys 0..p: an exact causal mask by position, so a recomputed token in the middle of the prompt never
sees later tokens. Grouped-query attention: query head h reads KV head ``h // (Hq // Hkv)``.

The torch path groups the query heads that share a KV head into one batch row (no K/V expansion) and
calls scaled_dot_product_attention with a boolean mask; when the queries are exactly 0..N-1 it uses the
built-in causal path, and when every query sees every key it passes no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import check, resolve_backend


def selected_attention_torch(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference. q: [Hq, M, D]; q_pos: [M]; k, v: [Hkv, N, D] -> [Hq, M, D]."""
    hq, m, d = q.shape
    hkv, n, _ = k.shape
    group = hq // hkv
    if m == 0:
        return q.new_empty(hq, 0, v.shape[-1])
    if m == n and int(q_pos[0]) == 0 and torch.equal(q_pos, torch.arange(n, device=q.device)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
    qg = q.reshape(hkv, group * m, d)
    if int(q_pos.min()) >= n - 1:
        out = F.scaled_dot_product_attention(qg, k, v, scale=scale)
    else:
        visible = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [M, N]
        mask = visible.repeat(group, 1) if group > 1 else visible
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(hq, m, -1)


def selected_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal-by-position attention of selected queries.

    q: [Hq, M, D] (rotated); q_pos: [M] int64 absolute positions (each < N); k, v: [Hkv, N, D] with key j
    at position j. Returns [Hq, M, D].
    """
    check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [heads, tokens, head_dim]")
    check(k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check(q.shape[-1] == k.shape[-1], f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    check(q.shape[0] % k.shape[0] == 0, f"query heads {q.shape[0]} not a multiple of KV heads {k.shape[0]}")
    check(q_pos.shape == (q.shape[1],), f"q_pos must be [{q.shape[1]}], got {tuple(q_pos.shape)}")
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device == q_pos.device, "q, q_pos, k, v must be on one device")
    if q_pos.numel():
        check(int(q_pos.max()) < k.shape[1] and int(q_pos.min()) >= 0,
              f"q_pos must lie in [0, {k.shape[1]}) (key j is at position j)")  # fmt: skip
    if resolve_backend(backend, q.device) == "triton":
        from .attention_triton import selected_attention_triton

        return selected_attention_triton(q, q_pos, k, v, scale)
    return selected_attention_torch(q, q_pos, k, v, scale)
