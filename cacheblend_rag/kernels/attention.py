"""Attention for a subset of query tokens, each at its own absolute position, over the full fused K/V.

Key j sits at absolute position j (the fused cache is ordered by position). A query at position p sees
keys 0..p: an exact causal mask by position, so a recomputed token in the middle of the prompt never
sees later tokens. Grouped-query attention: query head h reads KV head ``h // (Hq // Hkv)``.

The torch reference calls scaled_dot_product_attention with an additive [M, N] mask. On CPU the wrapper
uses ``selected_attention_cpu``, the same function computed faster: the fused causal kernel when the
queries are exactly 0..N-1, no mask when every query sees every key, and otherwise query blocks that
read only the keys they can see.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .backend import check, resolve_backend


def selected_attention_torch(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference. q: [Hq, M, D]; q_pos: [M]; k, v: [Hkv, N, D] -> [Hq, M, D]."""
    hq, m, _ = q.shape
    n = k.shape[1]
    if m == 0:
        return q.new_empty(hq, 0, v.shape[-1])
    hidden = torch.arange(n, device=q.device)[None, :] > q_pos[:, None]  # [M, N]
    bias = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
    # 4-D inputs: torch's fused CPU kernels only take [B, H, L, D]; 3-D falls back to the slow math path
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias, scale=scale,
                                         enable_gqa=hq != k.shape[0])  # fmt: skip
    return out[0]


QUERY_BLOCK = 256  # queries per block on the CPU path
_last_blocks = threading.local()  # the last call's blocks: the next layer usually has the same queries


def _query_blocks(q_pos: torch.Tensor, n: int, dtype: torch.dtype) -> list[tuple[int, int, int, torch.Tensor]]:
    """(first, end, keys, bias) per block of position-sorted queries; bias: [end-first, keys] additive mask."""
    cached = getattr(_last_blocks, "entry", None)
    if cached is not None:
        positions, size, kind, blocks = cached
        if size == n and kind == dtype and positions.device == q_pos.device and torch.equal(positions, q_pos):
            return blocks
    m = q_pos.shape[0]
    count = max(1, min(8, m // QUERY_BLOCK))
    bounds = [m * i // count for i in range(count + 1)]
    last = q_pos[[b - 1 for b in bounds[1:]]].tolist()
    blocks = []
    for a, b, p in zip(bounds, bounds[1:], last):
        hidden = torch.arange(p + 1, device=q_pos.device)[None, :] > q_pos[a:b, None]  # [Mb, p+1]
        bias = torch.zeros(hidden.shape, dtype=dtype, device=q_pos.device).masked_fill_(hidden, float("-inf"))
        blocks.append((a, b, p + 1, bias))
    _last_blocks.entry = (q_pos.clone(), n, dtype, blocks)
    return blocks


def selected_attention_cpu(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Fast CPU path, same function as the reference. q: [Hq, M, D]; q_pos: [M]; k, v: [Hkv, N, D].

    Queries 0..N-1 use the fused causal kernel. Otherwise the queries, sorted by position, are cut into
    blocks of about QUERY_BLOCK; a block whose last position is p only reads keys 0..p, so key blocks
    that are masked for the whole query block cost nothing (the coarse version of flash attention's
    causal block skipping). Each block's mask is [Mb, p+1], shared by all heads, and reused by the next
    call with the same position tensor (the next layer).
    """
    hq, m, _d = q.shape
    hkv, n, _ = k.shape
    gqa = hq != hkv
    if m == n and int(q_pos[0]) == 0 and torch.equal(q_pos, torch.arange(n, device=q.device)):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                              enable_gqa=gqa)[0]  # fmt: skip
    if int(q_pos.min()) >= n - 1:  # decoding: every key is visible
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale, enable_gqa=gqa)[0]
    order = None
    if m > 1 and bool((q_pos[1:] < q_pos[:-1]).any()):
        order = torch.argsort(q_pos)
        q, q_pos = q[:, order], q_pos[order]
    out = torch.empty_like(q)
    for a, b, keys, bias in _query_blocks(q_pos, n, q.dtype):
        out[:, a:b] = F.scaled_dot_product_attention(q[None, :, a:b], k[None, :, :keys], v[None, :, :keys],
                                                     attn_mask=bias, scale=scale, enable_gqa=gqa)[0]  # fmt: skip
    if order is not None:
        out = out[:, torch.argsort(order)]
    return out


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
    if q.device.type == "cpu":
        return selected_attention_cpu(q, q_pos, k, v, scale)
    return selected_attention_torch(q, q_pos, k, v, scale)
