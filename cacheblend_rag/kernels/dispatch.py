"""The kernels of one request: the backend is chosen once (``Kernels.on``), then every call goes to it.

The engine binds a ``Kernels`` to its model forward per request (``ModelForward.with_backend``), so the
prefill and the decoder call ``fwd.rotate`` / ``fwd.attend`` / ``fwd.kernels.deviation`` without passing a
backend name along. The checked wrappers (``apply_rope``, ``selected_attention``, ``kv_deviation``) still take
``backend=`` for direct callers such as the tests; given the resolved name they only validate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import selected_attention
from .backend import resolve_backend
from .deviation import kv_deviation
from .rotary import RopeTable, apply_rope


@dataclass(frozen=True)
class Kernels:
    """The blending kernels on one backend: ``"torch"`` (the references) or ``"triton"``."""

    backend: str

    @classmethod
    def on(cls, backend: str, device: torch.device) -> Kernels:
        """Resolve ``backend`` (``auto``, ``torch`` or ``triton``) for tensors on ``device``; raises with the fix
        when Triton cannot run there."""
        return cls(resolve_backend(backend, device))

    def rope(self, x: torch.Tensor, positions: torch.Tensor, table: RopeTable, *, out=None) -> torch.Tensor:
        """x: [H, T, D] before RoPE; positions: [T] -> rotated [H, T, D] (into ``out`` if given)."""
        return apply_rope(x, positions, table, out=out, backend=self.backend)

    def attention(self, q, q_pos, k, v, scale: float) -> torch.Tensor:
        """q: [Hq, M, D] rotated at q_pos: [M]; k, v: [Hkv, N, D], key j at position j -> [Hq, M, D]."""
        return selected_attention(q, q_pos, k, v, scale, backend=self.backend)

    def deviation(self, fresh, cached, from_cache, *, rows=None) -> torch.Tensor:
        """fresh: [H, M, D]; cached: [H, M, D] or [H, N, D] with ``rows``: [M]; from_cache: [M] -> [M] float32."""
        return kv_deviation(fresh, cached, from_cache, rows=rows, backend=self.backend)
