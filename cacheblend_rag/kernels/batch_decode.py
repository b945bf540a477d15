"""Attention of a batch of decoding queries, one per sequence, each over its own sequence's keys 0..pos[b].

The batch's caches are B views of one pool (``engine/kv_slots.py``): keys and values ``[B, Hkv, N, D]`` with any
strides, sequence b's key j at position j, rows past ``pos[b]`` never counted (they may hold another sequence's
old rows). Both implementations take the positions as a device tensor, so nothing is read on the host and a CUDA
graph captured once per batch size replays at every step.

* ``batch_decode_attention_torch`` (reference, and what CPU runs): the G query heads of a KV head are G queries
  of that head (``[B, Hkv, G, D]`` against ``[B, Hkv, N, D]``), one SDPA call for the whole batch with a mask of
  each sequence's keys. With ``length`` (a host int, max(pos) + 1) the keys are cut there, and a batch of one
  needs no mask (then it is ``decode_attention_torch`` exactly).
* ``batch_decode_kernel`` (Triton, CUDA): the flash-decoding kernel of ``kernels/decode_attention.py`` with a batch
  axis: one program per (sequence, KV head, range of keys); ranges past the sequence's position return at once.
  The partial softmaxes are merged by ``decode_attention.combine``.

What differs from the reference is what differs in ``kernels/decode_attention.py``: the order of float32 additions,
and in 16-bit types the attention weights rounded to the value dtype before P @ V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAVE_TRITON, check, resolve_backend, triton_interpreting
from .decode_attention import combine

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .decode_attention import decode_splits, split_softmax


def batch_decode_attention_torch(
    q: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, length: int | None = None
) -> torch.Tensor:
    """Reference. q: [Hq, B, D] rotated, query b at position pos[b] (pos: [B] int64); k, v: [B, Hkv, N, D].
    ``length``: max(pos) + 1 if the caller knows it (keys cut there; nothing is read either way) -> [Hq, B, D]."""
    hq, b, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(hkv, hq // hkv, b, d).permute(2, 0, 1, 3)  # [B, Hkv, G, D]: query head h reads KV head h // G
    if length is not None:
        k, v = k[:, :, :length], v[:, :, :length]
    if b == 1 and length is not None:  # one sequence, cut at its own length: no mask (SDPA's fused kernels)
        out = F.scaled_dot_product_attention(qg, k, v, scale=scale)
    else:
        visible = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]  # [B, N]
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :], scale=scale)
    return out.permute(1, 2, 0, 3).reshape(hq, b, v.shape[-1])  # [Hkv, G, B, D] -> [Hq, B, D]


if HAVE_TRITON:

    @triton.jit
    def batch_decode_kernel(
        q_ptr,
        pos_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        m_ptr,
        l_ptr,
        qk_scale,
        keys_per_split,
        stride_qh,
        stride_qb,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        N_HEADS: tl.constexpr,
        SPLITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # grid: (B, Hkv, SPLITS). Partial results: o [B * Hq, SPLITS, D], m and l [B * Hq, SPLITS], float32.
        seq = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        head = kv_head * GROUP + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_rows = q_ptr + seq * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        p_dtype = q.dtype
        if UPCAST:
            q = q.to(tl.float32)
        pos = tl.load(pos_ptr + seq).to(tl.int32)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, pos + 1)  # keys start..end-1; none if the range is past pos
        k_base = k_ptr + seq * stride_kb + kv_head * stride_kh + d[None, :] * stride_kd
        v_base = v_ptr + seq * stride_vb + kv_head * stride_vh + d[None, :] * stride_vd
        acc, m_i, l_i = split_softmax(
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            start,
            end,
            d_ok,
            qk_scale,
            p_dtype,
            BLOCK_G,
            BLOCK_D,
            BLOCK_N,
            UPCAST,
        )
        part = (seq * N_HEADS + head) * SPLITS + split
        tl.store(o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(m_ptr + part, m_i, mask=g_ok)
        tl.store(l_ptr + part, l_i, mask=g_ok)

    def batch_decode_attention_triton(
        q: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, length: int | None
    ) -> torch.Tensor:
        """Launcher. q: [Hq, B, D]; pos: [B] int64 on the device; k, v: [B, Hkv, N, D] (any strides); ``length``
        bounds the key ranges when known -> [Hq, B, D]."""
        hq, b, dim = q.shape
        hkv = k.shape[1]
        n = k.shape[2] if length is None else length
        group = hq // hkv
        block_n = 16 if triton_interpreting() else 64
        splits, per_split = decode_splits(n, b * hkv, block_n)
        o = torch.empty((b * hq, splits, dim), dtype=torch.float32, device=q.device)
        m = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
        l_sum = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
        batch_decode_kernel[(b, hkv, splits)](
            q,
            pos,
            k,
            v,
            o,
            m,
            l_sum,
            scale * 1.4426950408889634,
            per_split,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            *k.stride(),
            *v.stride(),
            N_HEADS=hq,
            SPLITS=splits,
            GROUP=group,
            BLOCK_G=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=dim,
            BLOCK_D=max(16, triton.next_power_of_2(dim)),
            BLOCK_N=block_n,
            UPCAST=triton_interpreting() and q.dtype != torch.float32,
            num_warps=4,
            num_stages=2,
        )
        out = combine(o, m, l_sum, q.dtype)  # [B * Hq, 1, D]
        return out.view(b, hq, dim).transpose(0, 1)


def batch_decode_attention(
    q: torch.Tensor,
    pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    length: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding query per sequence and query head, sequence b over its keys 0..pos[b].

    q: [Hq, B, D] rotated; pos: [B] int64 on q's device; k, v: [B, Hkv, N, D] (N > every pos; rows past a
    sequence's pos never count); length: max(pos) + 1 when the caller knows it. -> [Hq, B, D]. Nothing is read
    on the host, so a CUDA graph can capture the call.
    """
    check(q.dim() == 3, f"q must be [heads, batch, head_dim], got {tuple(q.shape)}")
    check(k.dim() == 4 and k.shape == v.shape, f"k and v must be one [B, Hkv, N, D] shape: {k.shape}, {v.shape}")
    check(k.shape[0] == q.shape[1], f"{q.shape[1]} queries but {k.shape[0]} sequences of keys")
    check(q.shape[0] % k.shape[1] == 0, f"query heads {q.shape[0]} not a multiple of KV heads {k.shape[1]}")
    check(q.shape[-1] == k.shape[-1], f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    check(
        pos.shape == (q.shape[1],) and pos.dtype == torch.int64,
        f"pos must be a [{q.shape[1]}] int64 tensor, got {pos.dtype} {tuple(pos.shape)}",
    )
    check(q.device == k.device == v.device == pos.device, "q, pos, k, v must be on one device")
    check(length is None or 0 < length <= k.shape[2], f"length must lie in [1, {k.shape[2]}], got {length}")
    if resolve_backend(backend, q.device) == "triton":
        check(q.shape[-1] <= 256, f"the Triton kernel supports head_dim <= 256, got {q.shape[-1]}; use backend='torch'")
        return batch_decode_attention_triton(q, pos, k, v, scale, length)
    return batch_decode_attention_torch(q, pos, k, v, scale, length)
