"""Blending kernels: each file holds a Triton kernel, its torch reference and a checked wrapper."""

from .attention import selected_attention
from .backend import BACKENDS, resolve_backend
from .deviation import kv_deviation, select_top
from .dispatch import Kernels
from .rotary import RopeTable, apply_rope
from .scatter import scatter_rows

__all__ = [
    "BACKENDS",
    "Kernels",
    "RopeTable",
    "apply_rope",
    "kv_deviation",
    "resolve_backend",
    "scatter_rows",
    "select_top",
    "selected_attention",
]
