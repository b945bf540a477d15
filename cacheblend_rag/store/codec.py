"""Optional int8 compression of stored KV: keys with one scale per channel, values with one scale per token.

Keys before RoPE have a few channels of much larger magnitude than the rest (KIVI, Liu et al. 2024), so a
key scale is shared along the tokens of a channel; value magnitudes vary by token, so a value scale is shared
along the channels of a token. Each scale is absmax / 127 (symmetric, round to nearest), kept in float32.
Decoding (``q * scale``, then cast) is deterministic, so every tier serves the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODECS = ("none", "int8")


@dataclass
class PackedKV:
    """The int8 form of a block. k, v: int8 [L, Hkv, T, D]; k_scale: float32 [L, Hkv, 1, D];
    v_scale: float32 [L, Hkv, T, 1]; dtype: what decoding gives (float16, or bfloat16 if float16 overflows)."""

    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.k_scale, self.v, self.v_scale))

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], dtype: torch.dtype) -> PackedKV:
        layers, heads, tokens, dim = shape
        return cls(
            torch.empty(shape, dtype=torch.int8),
            torch.empty(layers, heads, 1, dim, dtype=torch.float32),
            torch.empty(shape, dtype=torch.int8),
            torch.empty(layers, heads, tokens, 1, dtype=torch.float32),
            dtype,
        )


def _quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x: [L, Hkv, T, D]; dim: the axis one scale spans (2 = tokens, 3 = channels)
    x = x.float()
    absmax = x.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return (x / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q: int8 [..., T, D], scale: float32 broadcastable to q -> ``dtype`` [..., T, D]."""
    return (q.float() * scale).to(dtype)


def quantize_int8(k: torch.Tensor, v: torch.Tensor) -> PackedKV:
    """k, v: [L, Hkv, T, D] of any float dtype -> PackedKV."""
    qk, sk = _quantize(k, dim=2)
    qv, sv = _quantize(v, dim=3)
    dtype = torch.float16
    if not (torch.isfinite(dequantize(qk, sk, dtype)).all() and torch.isfinite(dequantize(qv, sv, dtype)).all()):
        dtype = torch.bfloat16
    return PackedKV(qk.contiguous(), sk.contiguous(), qv.contiguous(), sv.contiguous(), dtype)
