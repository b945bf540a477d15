"""Scatter recomputed K/V rows into the fused cache: ``dst[:, rows] = src``.

This stays a torch op (``index_copy_``) on every device: it is a single memory-bound copy that torch
already launches as one kernel, so a Triton version would buy nothing.
"""

from __future__ import annotations

import torch

from .backend import check


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst: [H, N, D]; rows: [M] int64 (distinct); src: [H, M, D]. Writes in place, returns dst."""
    check(dst.dim() == 3 and src.dim() == 3, "dst and src must be [heads, tokens, head_dim]")
    check(
        src.shape[0] == dst.shape[0] and src.shape[2] == dst.shape[2] and src.shape[1] == rows.shape[0],
        f"src {tuple(src.shape)} does not fit dst {tuple(dst.shape)} with {rows.shape[0]} rows",
    )
    if rows.numel() == 0:
        return dst
    return dst.index_copy_(1, rows, src.to(dst.dtype))
