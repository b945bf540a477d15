"""Per-token KV deviation between freshly computed and cached K or V, and top-k token selection.

``d[t] = sum over heads and head_dim of (fresh[t] - cached[t])^2`` accumulated in float32, for tokens
that came from the cache; tokens that did not get ``-inf`` so a top-k never picks them (cacheblend
recomputes them anyway). With ``rows``, token t of ``fresh`` is compared with row ``rows[t]`` of a
larger ``cached`` tensor (the fused cache), so the selected rows are never gathered into a copy.

Triton kernel (``deviation_kernel``): one program owns BLOCK_T tokens and walks every head and
head_dim block, accumulating squared differences in a [BLOCK_T, BLOCK_D] float32 tile that is summed
once at the end. The from-cache mask is fused: tokens not from the cache load nothing and get -inf.
It differs from the reference only in the order of the float32 additions (relative difference ~1e-6).
Limits: none on strides or head_dim. Each program reads its tokens' heads one after another, so a
launch has only cdiv(T, 32) programs and fills a large GPU (132 SMs on an H200) only from a few
thousand tokens on; at the check layer T is the whole prompt, so that is the common case.

The top-k stays in torch (``torch.topk``): it is a tiny fraction of the blend's time.
"""

from __future__ import annotations

import torch

from .backend import HAVE_TRITON, check, resolve_backend

if HAVE_TRITON:
    import triton
    import triton.language as tl


def kv_deviation_torch(
    fresh: torch.Tensor, cached: torch.Tensor, from_cache: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference. fresh: [H, T, D]; cached: [H, T, D] (or [H, N, D] with rows: [T]); from_cache: [T] bool
    -> [T] float32."""
    if rows is not None:
        cached = cached[:, rows]
    diff = fresh.float() - cached.float()
    dev = diff.square().sum(dim=(0, 2))
    return dev.masked_fill(~from_cache, float("-inf"))


if HAVE_TRITON:

    @triton.jit
    def deviation_kernel(
        fresh_ptr,
        cached_ptr,
        from_ptr,
        rows_ptr,
        out_ptr,
        H,
        T,
        D,
        stride_fh,
        stride_ft,
        stride_fd,
        stride_ch,
        stride_ct,
        stride_cd,
        HAS_ROWS: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # grid: (cdiv(T, BLOCK_T),)
        toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_range = toks < T
        live = (tl.load(from_ptr + toks, mask=in_range, other=0) != 0) & in_range
        if HAS_ROWS:
            crow = tl.load(rows_ptr + toks, mask=live, other=0).to(tl.int64)
        else:
            crow = toks
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for head in range(0, H):
            f_base = fresh_ptr + head * stride_fh + toks[:, None] * stride_ft
            c_base = cached_ptr + head * stride_ch + crow[:, None] * stride_ct
            for d0 in range(0, D, BLOCK_D):
                d = d0 + cols
                mask = live[:, None] & (d < D)[None, :]
                f = tl.load(f_base + d[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
                c = tl.load(c_base + d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
                diff = f - c
                acc += diff * diff
        dev = tl.sum(acc, axis=1)
        tl.store(out_ptr + toks, tl.where(live, dev, float("-inf")), mask=in_range)

    def kv_deviation_triton(
        fresh: torch.Tensor, cached: torch.Tensor, from_cache: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Launcher. fresh: [H, T, D]; cached: [H, T, D] or [H, N, D] with rows: [T]; from_cache: [T] bool."""
        heads, tokens, dim = fresh.shape
        out = torch.empty(tokens, dtype=torch.float32, device=fresh.device)
        if tokens == 0:
            return out
        from_cache = from_cache.contiguous()  # 1-D tensors are read at ptr + t
        rows = rows.contiguous() if rows is not None else None
        block_t = 32
        block_d = min(128, triton.next_power_of_2(dim))
        deviation_kernel[(triton.cdiv(tokens, block_t),)](
            fresh,
            cached,
            from_cache.view(torch.uint8),
            rows if rows is not None else out,
            out,
            heads,
            tokens,
            dim,
            *fresh.stride(),
            *cached.stride(),
            HAS_ROWS=rows is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=4,
            enable_fp_fusion=True,
        )
        return out


def kv_deviation(
    fresh: torch.Tensor,
    cached: torch.Tensor,
    from_cache: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    backend: str = "auto",
    bound: int | None = None,
) -> torch.Tensor:
    """Squared deviation per token. fresh: [H, T, D]; from_cache: [T] bool -> [T] float32.

    cached: [H, T, D]; or, with ``rows`` ([T] int64, each < N), [H, N, D] of which rows[t] is token t's.
    bound: None (``rows`` are read and checked to lie in [0, N): a device sync), or the caller's guarantee that
    every row lies in [0, bound] and below N (the engine's come from its plan): nothing is read.
    """
    check(
        fresh.dim() == 3
        and cached.dim() == 3
        and fresh.shape[0] == cached.shape[0]
        and fresh.shape[2] == cached.shape[2],
        f"fresh and cached must both be [heads, tokens, head_dim]; got {tuple(fresh.shape)} and {tuple(cached.shape)}",
    )
    if rows is None:
        check(
            fresh.shape == cached.shape,
            f"fresh {tuple(fresh.shape)} and cached {tuple(cached.shape)} differ; pass rows= to compare with "
            "some rows of a larger cached tensor",
        )
    else:
        check(
            rows.shape == (fresh.shape[1],) and rows.dtype in (torch.int32, torch.int64),
            f"rows must be an integer tensor of shape [{fresh.shape[1]}], got {rows.dtype} {tuple(rows.shape)}",
        )
        check(rows.device == fresh.device, f"rows on {rows.device} but fresh on {fresh.device}")
        if rows.numel() and bound is None:
            low, high = (int(v) for v in torch.aminmax(rows))
            check(low >= 0 and high < cached.shape[1], f"rows must lie in [0, {cached.shape[1]}), got [{low}, {high}]")
    check(
        from_cache.shape == (fresh.shape[1],) and from_cache.dtype == torch.bool,
        f"from_cache must be a bool tensor of shape [{fresh.shape[1]}], got {from_cache.dtype} "
        f"{tuple(from_cache.shape)}",
    )
    check(
        fresh.device == cached.device == from_cache.device,
        f"fresh, cached and from_cache on different devices: {fresh.device}, {cached.device}, {from_cache.device}",
    )
    if resolve_backend(backend, fresh.device) == "triton":
        return kv_deviation_triton(fresh, cached, from_cache, rows)
    return kv_deviation_torch(fresh, cached, from_cache, rows)


def select_top(deviation: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest finite deviations, sorted ascending. deviation: [T] -> [k] int64."""
    finite = int(torch.isfinite(deviation).sum())
    k = max(0, min(k, finite))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=deviation.device)
    return torch.topk(deviation, k, sorted=False).indices.sort().values
