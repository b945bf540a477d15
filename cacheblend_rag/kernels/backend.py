"""Pick the kernel backend: Triton on CUDA, the torch reference everywhere else."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: it only runs on CUDA devices (or on CPU through its interpreter).
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False

BACKENDS = ("auto", "torch", "triton")


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``."""
    if backend == "auto":
        return "triton" if HAVE_TRITON and device.type == "cuda" else "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install triton (Linux only)")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; use backend='torch' or "
                "'auto' on this device, or set TRITON_INTERPRET=1 before importing cacheblend_rag to run the "
                "kernels in Triton's (slow) interpreter"
            )
        return "triton"
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def check(cond: bool, message: str) -> None:
    """Raise ValueError with ``message`` unless ``cond``: the wrappers' shape and dtype contract."""
    if not cond:
        raise ValueError(message)


if HAVE_TRITON:

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """x (float32) rounded to nearest-even in ``dtype``, returned as float32 (a helper for the kernels).

        bfloat16 is rounded on the bits: Triton's interpreter truncates float32 -> bfloat16 casts where CUDA
        rounds to nearest-even, so with the bits a kernel computes the same function on both.
        """
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)
