"""Attention of one decoding query over the fused cache: the keys at its position and before.

The query of the token at position ``pos`` attends to keys 0..pos of a cache whose rows past ``pos`` may be
unfilled. Both implementations take ``pos`` as a one-element device tensor, so nothing is read on the host and a
CUDA graph captured once can be replayed at every position of a request.

* ``decode_attention_torch`` (reference, and what CPU runs): the G query heads of a KV head are treated as G
  queries of that head (``[1, Hkv, G, D]`` against ``[1, Hkv, N, D]``), so SDPA runs with equal head counts and
  never copies K or V per query head. With ``length`` (a host int, pos + 1) it attends to the first ``length``
  keys without a mask (SDPA's fused kernels); without it, a mask built from ``pos`` on the device hides the
  keys after it (what a captured graph needs).
* ``decode_kernel`` (Triton, CUDA): flash-decoding. The keys are cut into ``splits`` ranges; one program owns
  one KV head and one range, the G query heads of that head packed as rows of one tile (padded to 16 for
  ``tl.dot``), and runs the online softmax over the range's keys up to ``pos`` (ranges past it return at once).
  Each program writes its partial output, running max and sum in float32; ``_combine`` merges the ranges by
  their maxima. One query over 16k keys thus runs Hkv x splits programs instead of Hkv (the prefill kernel in
  attention.py has no split over keys).

What differs from the reference: the order of float32 additions; in 16-bit types the attention weights are
rounded to the value dtype before P @ V, as flash attention does. Under Triton's interpreter 16-bit operands
are upcast before each dot and roundings are done on the bits (the same workarounds as attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAVE_TRITON, check, resolve_backend, triton_interpreting

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .backend import round_to


def decode_attention_torch(
    q: torch.Tensor,
    pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    length: int | None = None,
) -> torch.Tensor:
    """Reference. q: [Hq, 1, D] rotated, at position ``pos`` ([1] int64 tensor); k, v: [Hkv, N, D], key j at
    position j. ``length``: pos + 1 if the caller knows it (no mask; nothing read either way) -> [Hq, 1, D]."""
    hq, _, d = q.shape
    hkv, n, _ = k.shape
    qg = q.reshape(hkv, hq // hkv, d)[None]  # [1, Hkv, G, D]: query head h reads KV head h // G
    if length is not None:
        out = F.scaled_dot_product_attention(qg, k[None, :, :length], v[None, :, :length], scale=scale)
    else:
        visible = (torch.arange(n, device=q.device) <= pos)[None, None, None, :]  # [1, 1, 1, N]
        out = F.scaled_dot_product_attention(qg, k[None], v[None], attn_mask=visible, scale=scale)
    return out[0].reshape(hq, 1, v.shape[-1])


if HAVE_TRITON:

    @triton.jit
    def split_softmax(
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        start,
        end,
        d_ok,
        qk_scale,
        p_dtype: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One split of a decoding query group: q [BLOCK_G, BLOCK_D] over keys start..end-1 (K/V rows at
        ``k_base``/``v_base`` + key x stride) with the online softmax -> acc [BLOCK_G, BLOCK_D], m_i, l_i (float32,
        unnormalised: ``combine`` merges the splits). Shared by the one-sequence and the batched decode kernels."""
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        offs = tl.arange(0, BLOCK_N)
        for block in range(start, end, BLOCK_N):
            keys = block + offs
            live = keys < end
            kv_mask = live[:, None] & d_ok[None, :]
            k = tl.load(k_base + keys[:, None] * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn, mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a live key
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UPCAST:
                p = round_to(p, p_dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(p_dtype).to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def decode_kernel(
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
        stride_qd,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vh,
        stride_vn,
        stride_vd,
        SPLITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # grid: (Hkv, SPLITS). Partial results: o [Hq, SPLITS, D], m and l [Hq, SPLITS], all float32.
        kv_head = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        head = kv_head * GROUP + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(
            q_ptr + head[:, None] * stride_qh + d[None, :] * stride_qd, mask=g_ok[:, None] & d_ok[None, :], other=0.0
        )
        p_dtype = q.dtype
        if UPCAST:
            q = q.to(tl.float32)
        pos = tl.load(pos_ptr).to(tl.int32)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, pos + 1)  # keys start..end-1; none if the range is past pos
        k_base = k_ptr + kv_head * stride_kh + d[None, :] * stride_kd
        v_base = v_ptr + kv_head * stride_vh + d[None, :] * stride_vd
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
        part = head * SPLITS + split
        tl.store(o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(m_ptr + part, m_i, mask=g_ok)
        tl.store(l_ptr + part, l_i, mask=g_ok)

    def decode_splits(n_keys: int, kv_heads: int, block_n: int = 64) -> tuple[int, int]:
        """(splits, keys per split) for a cache of ``n_keys`` rows: about 256 programs in all (two per SM of an
        H200), at least one key block each."""
        splits = max(1, min(triton.cdiv(n_keys, block_n), 256 // max(1, kv_heads)))
        per_split = triton.cdiv(triton.cdiv(n_keys, splits), block_n) * block_n
        return triton.cdiv(n_keys, per_split), per_split

    def decode_attention_triton(
        q: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Launcher. q: [Hq, 1, D]; pos: [1] int64 on the device; k, v: [Hkv, N, D] (any strides) -> [Hq, 1, D]."""
        hq, _, dim = q.shape
        hkv, n, _ = k.shape
        group = hq // hkv
        block_n = 16 if triton_interpreting() else 64
        splits, per_split = decode_splits(n, hkv, block_n)
        o = torch.empty((hq, splits, dim), dtype=torch.float32, device=q.device)
        m = torch.empty((hq, splits), dtype=torch.float32, device=q.device)
        l_sum = torch.empty((hq, splits), dtype=torch.float32, device=q.device)
        decode_kernel[(hkv, splits)](
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
            q.stride(2),
            *k.stride(),
            *v.stride(),
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
        return combine(o, m, l_sum, q.dtype)


def combine(o: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge per-range partial softmaxes. o: [Hq, S, D] unnormalised outputs; m, l_sum: [Hq, S] their running max
    (log2 units) and sum; ranges with no key have m = -inf and l_sum = 0 (range 0 always has key 0) -> [Hq, 1, D]."""
    top = m.amax(dim=1, keepdim=True)  # [Hq, 1], finite
    w = torch.exp2(m - top)  # [Hq, S]; 0 for empty ranges
    num = (o * w[..., None]).sum(dim=1)  # [Hq, D]
    den = (l_sum * w).sum(dim=1, keepdim=True)  # [Hq, 1]
    return (num / den).to(dtype)[:, None]


def decode_attention(
    q: torch.Tensor,
    pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    length: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding query per query head over keys 0..pos.

    q: [Hq, 1, D] rotated; pos: [1] int64 tensor on q's device; k, v: [Hkv, N, D] (N > pos; rows past pos are
    never used); length: pos + 1 when the caller knows it (the torch path then needs no mask). -> [Hq, 1, D].
    Nothing is read on the host, so a CUDA graph can capture the call.
    """
    check(q.dim() == 3 and q.shape[1] == 1, f"q must be [heads, 1, head_dim], got {tuple(q.shape)}")
    check(
        k.dim() == 3 and k.shape == v.shape,
        f"k and v must be one [Hkv, N, D] shape: {tuple(k.shape)}, {tuple(v.shape)}",
    )
    check(q.shape[0] % k.shape[0] == 0, f"query heads {q.shape[0]} not a multiple of KV heads {k.shape[0]}")
    check(q.shape[-1] == k.shape[-1], f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    check(
        pos.shape == (1,) and pos.dtype == torch.int64,
        f"pos must be a [1] int64 tensor, got {pos.dtype} {tuple(pos.shape)}",
    )
    check(q.device == k.device == v.device == pos.device, "q, pos, k, v must be on one device")
    check(length is None or 0 < length <= k.shape[1], f"length must lie in [1, {k.shape[1]}], got {length}")
    if resolve_backend(backend, q.device) == "triton":
        check(q.shape[-1] <= 256, f"the Triton kernel supports head_dim <= 256, got {q.shape[-1]}; use backend='torch'")
        return decode_attention_triton(q, pos, k, v, scale)
    return decode_attention_torch(q, pos, k, v, scale, length)
