"""Attention for a subset of query tokens, each at its own absolute position, over the full fused K/V.

Key j sits at absolute position j (the fused cache is ordered by position). A query at position p sees
keys 0..p: an exact causal mask by position, so a recomputed token in the middle of the prompt never
sees later tokens. Grouped-query attention: query head h reads KV head ``h // (Hq // Hkv)``.

Three implementations of one function:

* ``selected_attention_torch`` (reference): scaled_dot_product_attention with an additive [M, N] mask.
* ``selected_attention_cpu`` (what CPU users run): the fused causal kernel when the queries are exactly
  0..N-1, no mask when every query sees every key, otherwise blocks of position-sorted queries, each two fused
  calls merged by log-sum-exp: the keys before the block's first position without a mask, and the strip up to
  its last position with one (keys after it are never read).
* ``attention_kernel`` (Triton, what CUDA users run): flash-attention forward. One program owns one KV
  head and BLOCK_M packed rows, a row being (query, query head of that KV head's group), so the G query
  heads of a group share every K/V tile they load (GQA packing; decoding fills G rows with one query).
  It walks key blocks of BLOCK_N with the online softmax (running max and sum in float32, exp2 with the
  scale folded into log2(e)), never materialising scores or a mask beyond one [BLOCK_M, BLOCK_N] tile.
  Key blocks that lie at or before the block's smallest query position need no mask; masked blocks run
  up to the block's largest query position, and key blocks after it are never read (causal block
  skipping). Programs start with the last (longest) query blocks so the tail of the launch is short.

What differs from the reference: the order of the float32 additions; in 16-bit types the attention
weights are rounded to the value dtype before P @ V (as flash attention does), so bf16 results differ
from SDPA by bf16 rounding (~1e-2 relative on single elements). Float32 inputs use 3xTF32 dot products
on CUDA (float32-level accuracy, not plain TF32; "ieee" dots spill registers). Under the interpreter,
16-bit q/k/v are upcast to float32 before each dot (its dot reads bfloat16 bits as integers) and the
roundings to bfloat16 are done on the bits (its casts truncate): products are exact either way, so the
interpreted kernel computes what the CUDA one does up to summation order.

Limits: the causal skip pays only when queries are sorted by position (the engine passes them sorted;
unsorted input is correct but each block reads up to its largest position). No split over keys, so a
single decoding query runs Hkv programs over all N keys (fine for prefill, slower than SDPA for long
decodes). head_dim up to 256. Block sizes are fixed per head_dim and dtype, chosen by compiling for sm_90
without a GPU (no register spills at the defaults); ``benchmarks/kernel_check.py`` sweeps alternatives.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .backend import HAVE_TRITON, check, resolve_backend, triton_interpreting

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .backend import round_to


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
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=bias, scale=scale, enable_gqa=hq != k.shape[0]
    )
    return out[0]


QUERY_BLOCK = 128  # queries per block on the CPU path
_last_blocks = threading.local()  # the last call's blocks: the next layer usually has the same queries

# torch's fused CPU flash attention, returning the log-sum-exp of each row's scores (SDPA's public API does not)
_FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _query_blocks(
    q_pos: torch.Tensor, n: int, dtype: torch.dtype, group: int
) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """(a, b, first, last, bias) per block of the position-sorted queries a..b-1, first = q_pos[a], last =
    q_pos[b-1]; bias: [group * (b-a), last-first+1] additive mask over keys first..last, a block's query rows
    repeated for the ``group`` query heads of a KV head (packed as rows, the causal flag cannot express it)."""
    cached = getattr(_last_blocks, "entry", None)
    if cached is not None:
        positions, size, kind, heads, blocks = cached
        same = (size, kind, heads) == (n, dtype, group) and positions.device == q_pos.device
        if same and torch.equal(positions, q_pos):
            return blocks
    m = q_pos.shape[0]
    count = max(1, round(m / QUERY_BLOCK))
    bounds = [m * i // count for i in range(count + 1)]
    firsts = q_pos[bounds[:-1]].tolist()
    lasts = q_pos[[b - 1 for b in bounds[1:]]].tolist()
    blocks = []
    for a, b, first, last in zip(bounds[:-1], bounds[1:], firsts, lasts, strict=True):
        hidden = torch.arange(first, last + 1, device=q_pos.device)[None, :] > q_pos[a:b, None]  # [Mb, width]
        bias = torch.zeros(hidden.shape, dtype=dtype, device=q_pos.device).masked_fill_(hidden, float("-inf"))
        blocks.append((a, b, first, last, bias.repeat(group, 1)))
    _last_blocks.entry = (q_pos.clone(), n, dtype, group, blocks)
    return blocks


def _block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, last: int, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query block. q: [1, Hkv, G*Mb, D] (a KV head's G query heads packed as rows, so they share every K/V
    tile); k, v: [Hkv, N, D] -> [1, Hkv, G*Mb, D].

    Keys before ``first`` are visible to every query of the block: one fused call without a mask. Keys
    first..last: a second call with the block's mask ``bias`` [G*Mb, last-first+1]. The two partial
    softmaxes are merged by their log-sum-exps, so no query reads a key after ``last`` and only the
    first..last strip pays for a mask."""
    own, lse_own = _FLASH_LSE(
        q, k[None, :, first : last + 1], v[None, :, first : last + 1], 0.0, False, attn_mask=bias, scale=scale
    )
    if first == 0:
        return own
    before, lse_before = _FLASH_LSE(q, k[None, :, :first], v[None, :, :first], 0.0, False, scale=scale)
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    top = torch.maximum(lse_before, lse_own).to(acc)
    w_before = torch.exp(lse_before.to(acc) - top)[..., None]  # [1, Hkv, G*Mb, 1]
    w_own = torch.exp(lse_own.to(acc) - top)[..., None]
    return ((before.to(acc) * w_before + own.to(acc) * w_own) / (w_before + w_own)).to(q.dtype)


def selected_attention_cpu(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Fast CPU path, same function as the reference. q: [Hq, M, D]; q_pos: [M]; k, v: [Hkv, N, D].

    Queries 0..N-1 use the fused causal kernel, and queries that see every key a kernel without a mask.
    Otherwise the queries, sorted by position, are cut into blocks of about QUERY_BLOCK (``_block_attention``):
    a block reads the keys before its first position without a mask and only the strip up to its last position
    with one, so the keys no query of the block can see cost nothing (flash attention's causal block skipping,
    at the granularity of a block). The masks are built once per position tensor and reused by the next call
    with it (the next layer).
    """
    hq, m, d = q.shape
    hkv, n, _ = k.shape
    gqa = hq != hkv
    if m == 0:
        return q.new_empty(hq, 0, v.shape[-1])
    if m == n and int(q_pos[0]) == 0 and torch.equal(q_pos, torch.arange(n, device=q.device)):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=gqa)[0]
    if int(q_pos.min()) >= n - 1:  # decoding: every key is visible
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale, enable_gqa=gqa)[0]
    if _FLASH_LSE is None:  # a torch without the fused op: the reference's single masked call
        return selected_attention_torch(q, q_pos, k, v, scale)
    order = None
    if m > 1 and bool((q_pos[1:] < q_pos[:-1]).any()):
        order = torch.argsort(q_pos)
        q, q_pos = q[:, order], q_pos[order]
    group = hq // hkv
    grouped = q.reshape(hkv, group, m, d)  # query head h reads KV head h // group
    out = torch.empty(hkv, group, m, v.shape[-1], dtype=q.dtype, device=q.device)
    for a, b, first, last, bias in _query_blocks(q_pos, n, q.dtype, group):
        rows = grouped[:, :, a:b].reshape(1, hkv, group * (b - a), d)
        out[:, :, a:b] = _block_attention(rows, k, v, first, last, bias, scale)[0].view(hkv, group, b - a, -1)
    out = out.view(hq, m, -1)
    if order is not None:
        out = out[:, torch.argsort(order)]
    return out


if HAVE_TRITON:

    @triton.jit
    def _dot(a, b, FP32: tl.constexpr):
        if FP32:  # float32 inputs: 3xTF32 keeps float32 accuracy on tensor cores ("ieee" spills registers)
            return tl.dot(a, b, input_precision="tf32x3")
        return tl.dot(a, b)

    @triton.jit
    def _online_softmax_step(
        q,
        k,
        v,
        acc,
        m_i,
        l_i,
        qk_scale,
        visible,
        MASKED: tl.constexpr,
        P_DTYPE: tl.constexpr,
        FP32: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One key block: q [BM, BD], k, v [BN, BD], visible [BM, BN] (used if MASKED) -> acc, m_i, l_i."""
        s = _dot(q, tl.trans(k), FP32) * qk_scale
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:  # v is float32 here; round p as CUDA would (the interpreter's bf16 casts truncate)
            p = round_to(p, P_DTYPE)
        acc = acc * alpha[:, None] + _dot(p.to(P_DTYPE).to(v.dtype), v, FP32)
        return acc, m_new, l_i

    @triton.jit
    def attention_kernel(
        q_ptr,
        pos_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        qk_scale,
        M,
        N,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_oh,
        stride_om,
        stride_od,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FP32: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # grid: (cdiv(M * GROUP, BLOCK_M), Hkv); row r of a block is query r // GROUP, head r % GROUP of the group
        block = tl.num_programs(0) - 1 - tl.program_id(0)  # longest blocks first (with sorted queries)
        kv_head = tl.program_id(1).to(tl.int64)
        packed = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        query = packed // GROUP
        head = kv_head * GROUP + packed % GROUP
        row_ok = query < M
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(
            q_ptr + head[:, None] * stride_qh + query[:, None] * stride_qm + d[None, :] * stride_qd,
            mask=q_mask,
            other=0.0,
        )
        p_dtype = q.dtype  # attention weights are rounded to the input dtype before P @ V
        if UPCAST:  # the interpreter's dot reads 16-bit floats as integers; float32 products are the same
            q = q.to(tl.float32)
        pos = tl.load(pos_ptr + query, mask=row_ok, other=0).to(tl.int32)  # padding rows see key 0 only
        first = tl.min(tl.where(row_ok, pos, N), axis=0)
        last = tl.max(pos, axis=0)
        unmasked_end = (first + 1) // BLOCK_N * BLOCK_N  # key blocks every row of the block sees whole
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = k_ptr + kv_head * stride_kh + d[None, :] * stride_kd
        v_base = v_ptr + kv_head * stride_vh + d[None, :] * stride_vd
        offs = tl.arange(0, BLOCK_N)
        for start in range(0, unmasked_end, BLOCK_N):
            keys = start + offs
            k = tl.load(k_base + keys[:, None] * stride_kn, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn, mask=d_ok[None, :], other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, None, False, p_dtype, FP32, UPCAST)
        # every row sees key 0, so m_i is finite after the first block and masked (-inf) scores give p = 0
        for start in range(unmasked_end, last + 1, BLOCK_N):
            keys = start + offs
            kv_mask = (keys < N)[:, None] & d_ok[None, :]
            k = tl.load(k_base + keys[:, None] * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn, mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            visible = keys[None, :] <= pos[:, None]
            acc, m_i, l_i = _online_softmax_step(q, k, v, acc, m_i, l_i, qk_scale, visible, True, p_dtype, FP32, UPCAST)
        out = acc / l_i[:, None]
        if UPCAST:
            out = round_to(out, p_dtype)
        tl.store(
            o_ptr + head[:, None] * stride_oh + query[:, None] * stride_om + d[None, :] * stride_od,
            out.to(o_ptr.dtype.element_ty),
            mask=q_mask,
        )

    def attention_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
        """Block sizes and launch settings for a head_dim and dtype (chosen without a GPU to tune on)."""
        if triton_interpreting():
            return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
        if dtype == torch.float32:
            return {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 2}
        if head_dim <= 64:
            return {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}
        if head_dim <= 128:
            return {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
        return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2}

    def selected_attention_triton(
        q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **config: int
    ) -> torch.Tensor:
        """Launcher. q: [Hq, M, D]; q_pos: [M]; k, v: [Hkv, N, D] (any strides) -> [Hq, M, D] contiguous.

        ``config`` overrides entries of ``attention_config`` (block_m, block_n, num_warps, num_stages).
        """
        hq, m, dim = q.shape
        hkv, n, _ = k.shape
        out = torch.empty((hq, m, dim), dtype=q.dtype, device=q.device)
        if m == 0 or hq == 0:
            return out
        group = hq // hkv
        q_pos = q_pos.contiguous()  # read at pos_ptr + i
        cfg = {**attention_config(dim, q.dtype), **config}
        grid = (triton.cdiv(m * group, cfg["block_m"]), hkv)
        attention_kernel[grid](
            q,
            q_pos,
            k,
            v,
            out,
            scale * 1.4426950408889634,
            m,
            n,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            GROUP=group,
            HEAD_DIM=dim,
            BLOCK_D=max(16, triton.next_power_of_2(dim)),
            BLOCK_M=cfg["block_m"],
            BLOCK_N=cfg["block_n"],
            FP32=q.dtype == torch.float32,
            UPCAST=triton_interpreting() and q.dtype != torch.float32,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            enable_fp_fusion=True,
        )
        return out


def selected_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
    bound: int | None = None,
    reads_host: bool = True,
) -> torch.Tensor:
    """Causal-by-position attention of selected queries.

    q: [Hq, M, D] (rotated); q_pos: [M] int64 absolute positions (each < N); k, v: [Hkv, N, D] with key j
    at position j. Returns [Hq, M, D].

    bound: None (q_pos is read and checked to lie in [0, N): one device sync), or the caller's guarantee that every
    position lies in [0, bound] and below N (the engine builds its positions from the request's plan): nothing is
    read. reads_host: CPU tensors may take the fast CPU path, which reads positions on the host; False runs the
    torch reference instead, which reads nothing (the code a CUDA device runs with the torch backend).
    """
    check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [heads, tokens, head_dim]")
    check(k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check(q.shape[-1] == k.shape[-1], f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    check(q.shape[0] % k.shape[0] == 0, f"query heads {q.shape[0]} not a multiple of KV heads {k.shape[0]}")
    check(q_pos.shape == (q.shape[1],), f"q_pos must be [{q.shape[1]}], got {tuple(q_pos.shape)}")
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device == q_pos.device, "q, q_pos, k, v must be on one device")
    check(q_pos.dtype in (torch.int32, torch.int64), f"q_pos must be integers, got {q_pos.dtype}")
    if q_pos.numel() and bound is None:
        low, high = (int(x) for x in torch.aminmax(q_pos))
        check(
            low >= 0 and high < k.shape[1],
            f"q_pos must lie in [0, {k.shape[1]}) (key j is at position j), got [{low}, {high}]",
        )
    if resolve_backend(backend, q.device) == "triton":
        check(q.shape[-1] <= 256, f"the Triton kernel supports head_dim <= 256, got {q.shape[-1]}; use backend='torch'")
        check(
            q.dtype in (torch.float32, torch.float16, torch.bfloat16),
            f"the Triton kernel supports fp32/fp16/bf16, got {q.dtype}; use backend='torch'",
        )
        return selected_attention_triton(q, q_pos, k, v, scale)
    if q.device.type == "cpu" and reads_host:
        return selected_attention_cpu(q, q_pos, k, v, scale)
    return selected_attention_torch(q, q_pos, k, v, scale)
