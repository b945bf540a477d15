"""Rotary position embedding (NeoX / half-split layout) applied at arbitrary absolute positions.

Cached keys are stored before RoPE, so placing a chunk anywhere in a prompt is one rotation of its keys
to their new absolute positions. The angle of pair i at position p is ``p * inv_freq[i]``; Llama 3 (and
linear / YaRN) scaling lives entirely in ``inv_freq`` and ``attention_scaling``, so one kernel serves them.

Reference (``apply_rope_torch``): Hugging Face's arithmetic exactly: cos/sin computed in float32, scaled,
cast to the tensor's dtype, then ``x1*cos - x2*sin`` and ``x2*cos + x1*sin`` in that dtype.

Triton kernel (``rope_kernel``): one program rotates BLOCK_T tokens of one head, in place or into
another tensor, any strides. It does not evaluate cos/sin itself: it gathers them from the same
``RopeTable`` rows the reference uses (float32 table computed by torch, cast to x's dtype), because
``tl.cos`` on large angles (position x inv_freq reaches 10^4 radians) is not the function torch computes.
Every product and sum is rounded to x's dtype as torch does (16-bit products are exact in float32, so
"compute in float32, round" is the same IEEE operation; bfloat16 is rounded on the bits by
``backend.round_to`` because the interpreter's casts truncate), and the launch disables FMA contraction.
The result is bitwise equal to the reference under the interpreter (tested) and should be on CUDA by
the same construction (``benchmarks/kernel_check.py`` reports it as ``bitwise_vs_torch``; the one H200 run's value
was not recorded).

Limits: head_dim must be even (any even size; a power of two is fastest); positions must be >= 0
(the wrapper checks, which costs one device sync for ``aminmax``, unless the caller passes ``bound``: the
engine does, its positions come from the request's plan); ``out`` must be ``x`` itself or a
tensor that does not overlap it. The table costs 2 x head_dim/2 reads per token, shared by the heads
through L2 (the heads of one token block are neighbours in the launch grid).
"""

from __future__ import annotations

import threading

import torch

from .backend import HAVE_TRITON, check, resolve_backend

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .backend import round_to


class RopeTable:
    """RoPE frequencies plus a lazily grown table of cos/sin per position and dtype, shared by requests."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        # inv_freq: [D/2]
        self.inv_freq = inv_freq.detach().float()
        self.attention_scaling = float(attention_scaling)
        self.head_dim = 2 * self.inv_freq.numel()
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def tables(self, need: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [P, D] in ``dtype`` for positions 0..P-1 with P >= ``need`` (grown by doubling)."""
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < need:
            with self._lock:
                table = self._tables.get(key)
                if table is None or table[0].shape[0] < need:
                    size = max(need, 2 * table[0].shape[0] if table is not None else 4096)
                    table = self._build(size, dtype, device)
                    self._tables[key] = table
        return table

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, bound: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, D] in ``dtype`` for positions: [T] (int64). ``bound``: a known upper bound on the positions
        (no device read); without it the maximum is read (a device sync on CUDA)."""
        if bound is not None:
            need = bound + 1
        else:
            need = int(positions.max()) + 1 if positions.numel() else 1
        cos, sin = self.tables(need, dtype, positions.device)
        return cos[positions], sin[positions]

    def _build(self, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin


def apply_rope_torch(
    x: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeTable,
    out: torch.Tensor | None = None,
    bound: int | None = None,
) -> torch.Tensor:
    """Reference. x: [H, T, D]; positions: [T] -> [H, T, D] (into ``out`` if given; it may be x). ``bound``: an
    upper bound on the positions, if known (saves reading their maximum).

    Written on the two halves: ``x1*cos - x2*sin`` and ``x2*cos + x1*sin`` are the same IEEE operations as
    Hugging Face's ``x*cos + rotate_half(x)*sin`` (its cos/sin repeat across the halves), so results are
    bitwise equal, without the concatenations.
    """
    cos, sin = rope.cos_sin(positions, x.dtype, bound)
    half = x.shape[-1] // 2
    cos, sin = cos[:, :half], sin[:, :half]
    x1, x2 = x[..., :half], x[..., half:]
    first = x1 * cos - x2 * sin
    second = x2 * cos + x1 * sin
    if out is None:
        return torch.cat((first, second), dim=-1)
    out[..., :half] = first
    out[..., half:] = second
    return out


if HAVE_TRITON:

    @triton.jit
    def rope_kernel(
        x_ptr,
        out_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        T,
        stride_xh,
        stride_xt,
        stride_xd,
        stride_oh,
        stride_ot,
        stride_od,
        stride_table,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        # grid: (H, cdiv(T, BLOCK_T)); the heads of one token block run side by side, sharing table rows in L2
        head = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_HALF)
        mask = (rows < T)[:, None] & (cols < HALF)[None, :]
        pos = tl.load(pos_ptr + rows, mask=rows < T, other=0).to(tl.int64)
        table = pos[:, None] * stride_table + cols[None, :]
        dtype = out_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        src = x_ptr + head * stride_xh + rows[:, None] * stride_xt + cols[None, :] * stride_xd
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        # round every operation to x's dtype, as torch does: bitwise equal to the reference
        a = round_to(x1 * cos, dtype)
        b = round_to(x2 * sin, dtype)
        c = round_to(x2 * cos, dtype)
        d = round_to(x1 * sin, dtype)
        dst = out_ptr + head * stride_oh + rows[:, None] * stride_ot + cols[None, :] * stride_od
        tl.store(dst, round_to(a - b, dtype).to(dtype), mask=mask)
        tl.store(dst + HALF * stride_od, round_to(c + d, dtype).to(dtype), mask=mask)

    def apply_rope_triton(
        x: torch.Tensor, positions: torch.Tensor, rope: RopeTable, out: torch.Tensor, max_position: int
    ) -> None:
        """Launcher. x, out: [H, T, D] (any strides; out may be x); positions: [T] each <= max_position."""
        heads, tokens, dim = x.shape
        if tokens == 0 or heads == 0:
            return
        cos, sin = rope.tables(max_position + 1, x.dtype, x.device)
        positions = positions.contiguous()  # the kernel reads positions[t] at pos_ptr + t
        block_t = 32
        half = dim // 2
        grid = (heads, triton.cdiv(tokens, block_t))
        rope_kernel[grid](
            x,
            out,
            positions,
            cos,
            sin,
            tokens,
            *x.stride(),
            *out.stride(),
            cos.stride(0),
            HALF=half,
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_T=block_t,
            num_warps=4,
            enable_fp_fusion=False,
        )


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeTable,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    bound: int | None = None,
) -> torch.Tensor:
    """Rotate pre-RoPE vectors to absolute ``positions``.

    x: [H, T, D] (any strides); positions: [T] int64 on x's device; out: None (new tensor), or a
    [H, T, D] tensor to write into (``out=x`` rotates in place). Returns the rotated tensor.
    bound: None (the positions are read and checked to be >= 0: one device sync), or an int the caller
    guarantees every position lies in [0, bound] (nothing is read: the engine's layer loop passes it).
    """
    check(x.dim() == 3, f"x must be [heads, tokens, head_dim], got shape {tuple(x.shape)}")
    check(x.shape[-1] == rope.head_dim, f"x's head_dim {x.shape[-1]} != RoPE head_dim {rope.head_dim}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be fp32/fp16/bf16, got {x.dtype}")
    check(
        positions.dim() == 1 and positions.shape[0] == x.shape[1],
        f"positions must be [tokens={x.shape[1]}], got shape {tuple(positions.shape)}",
    )
    check(positions.dtype in (torch.int32, torch.int64), f"positions must be integers, got {positions.dtype}")
    check(positions.device == x.device, f"positions on {positions.device} but x on {x.device}")
    max_position = 0
    if bound is not None:
        check(bound >= 0, f"bound must be >= 0, got {bound}")
        max_position = bound
    elif positions.numel():
        low, high = (int(v) for v in torch.aminmax(positions))
        check(low >= 0, f"positions must be >= 0, got a minimum of {low}")
        max_position = high
    if out is not None:
        check(
            out.shape == x.shape and out.dtype == x.dtype and out.device == x.device,
            f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}); got ({tuple(out.shape)}, "
            f"{out.dtype}, {out.device})",
        )
    if resolve_backend(backend, x.device) == "triton":
        target = out if out is not None else torch.empty_like(x)
        apply_rope_triton(x, positions, rope, target, max_position)
        return target
    return apply_rope_torch(x, positions, rope, out, max_position)
