"""Rotary position embedding (NeoX / half-split layout) applied at arbitrary absolute positions.

Cached keys are stored before RoPE, so placing a chunk anywhere in a prompt is one rotation of its keys
to their new absolute positions. The angle of pair i at position p is ``p * inv_freq[i]``; Llama 3 (and
linear / YaRN) scaling lives entirely in ``inv_freq`` and ``attention_scaling``, so one kernel serves them.

The torch reference reproduces Hugging Face's arithmetic exactly: cos/sin computed in float32, scaled,
cast to the tensor's dtype, then ``x * cos + rotate_half(x) * sin`` in that dtype. The Triton kernel
computes cos/sin on the fly in float32 and rounds once at the end, so in 16-bit types it can differ
from the reference by one rounding step.
"""

from __future__ import annotations

import threading

import torch

from .backend import HAVE_TRITON, check, resolve_backend

if HAVE_TRITON:
    import triton
    import triton.language as tl


class RopeTable:
    """RoPE frequencies plus a lazily grown float32 table of cos/sin per position, shared by requests."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        # inv_freq: [D/2]
        self.inv_freq = inv_freq.detach().float()
        self.attention_scaling = float(attention_scaling)
        self.head_dim = 2 * self.inv_freq.numel()
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, D] in ``dtype`` for positions: [T] (int64)."""
        device = positions.device
        need = int(positions.max()) + 1 if positions.numel() else 1
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < need:
            with self._lock:
                table = self._tables.get(key)
                if table is None or table[0].shape[0] < need:
                    size = max(need, 2 * table[0].shape[0] if table is not None else 4096)
                    table = self._build(size, dtype, device)
                    self._tables[key] = table
        cos, sin = table
        return cos[positions], sin[positions]

    def _build(self, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin


def apply_rope_torch(x: torch.Tensor, positions: torch.Tensor, rope: RopeTable, out: torch.Tensor | None = None
                     ) -> torch.Tensor:  # fmt: skip
    """Reference. x: [H, T, D]; positions: [T] -> [H, T, D] (into ``out`` if given; it may be x).

    Written on the two halves: ``x1*cos - x2*sin`` and ``x2*cos + x1*sin`` are the same IEEE operations as
    Hugging Face's ``x*cos + rotate_half(x)*sin`` (its cos/sin repeat across the halves), so results are
    bitwise equal, without the concatenations.
    """
    cos, sin = rope.cos_sin(positions, x.dtype)
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
    def _rope_kernel(
        x_ptr, out_ptr, pos_ptr, inv_freq_ptr, scaling,
        T, stride_xh, stride_xt, stride_xd, stride_oh, stride_ot, stride_od,
        HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # grid: (cdiv(T, BLOCK_T), H). Each program rotates BLOCK_T rows of one head.
        pid_t = tl.program_id(0)
        head = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, HALF)
        row_ok = rows < T
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.float32)
        inv_freq = tl.load(inv_freq_ptr + cols)
        angle = pos[:, None] * inv_freq[None, :]
        cos = tl.cos(angle) * scaling
        sin = tl.sin(angle) * scaling
        mask = row_ok[:, None]
        base = x_ptr + head * stride_xh + rows[:, None] * stride_xt
        x1 = tl.load(base + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + (cols[None, :] + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
        out = out_ptr + head * stride_oh + rows[:, None] * stride_ot
        tl.store(out + cols[None, :] * stride_od, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(
            out + (cols[None, :] + HALF) * stride_od, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask
        )

    def apply_rope_triton(x: torch.Tensor, positions: torch.Tensor, rope: RopeTable, out: torch.Tensor) -> None:
        """Launcher. x, out: [H, T, D] (any strides; out may be x); positions: [T]."""
        heads, tokens, dim = x.shape
        if tokens == 0 or heads == 0:
            return
        inv_freq = rope.inv_freq.to(x.device)
        block_t = 32
        grid = (triton.cdiv(tokens, block_t), heads)
        _rope_kernel[grid](
            x, out, positions, inv_freq, rope.attention_scaling,
            tokens, *x.stride(), *out.stride(),
            HALF=dim // 2, BLOCK_T=block_t,
        )  # fmt: skip


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeTable,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate pre-RoPE vectors to absolute ``positions``.

    x: [H, T, D] (any strides); positions: [T] int64 on x's device; out: None (new tensor), or a
    [H, T, D] tensor to write into (``out=x`` rotates in place). Returns the rotated tensor.
    """
    check(x.dim() == 3, f"x must be [heads, tokens, head_dim], got shape {tuple(x.shape)}")
    check(x.shape[-1] == rope.head_dim, f"x's head_dim {x.shape[-1]} != RoPE head_dim {rope.head_dim}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be fp32/fp16/bf16, got {x.dtype}")
    check(positions.dim() == 1 and positions.shape[0] == x.shape[1],
          f"positions must be [tokens={x.shape[1]}], got shape {tuple(positions.shape)}")  # fmt: skip
    check(positions.dtype in (torch.int32, torch.int64), f"positions must be integers, got {positions.dtype}")
    check(positions.device == x.device, f"positions on {positions.device} but x on {x.device}")
    if positions.numel():
        check(int(positions.min()) >= 0, "positions must be >= 0")
    if out is not None:
        check(out.shape == x.shape and out.dtype == x.dtype and out.device == x.device,
              f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device})")  # fmt: skip
    if resolve_backend(backend, x.device) == "triton":
        target = out if out is not None else torch.empty_like(x)
        apply_rope_triton(x, positions, rope, target)
        return target
    return apply_rope_torch(x, positions, rope, out)
