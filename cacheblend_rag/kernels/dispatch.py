"""The kernels of one request: the backend and what they may read on the host, chosen once (``Kernels.on``,
``Kernels.within``), then every call goes to them.

The engine binds a ``Kernels`` to its model forward per request (``ModelForward.with_backend``), and each driver
of the model (the prefill, a decoding step, the batched precompute and decode) binds it to the positions it runs
(``ModelForward.within``), so the prefill and the decoder call ``fwd.rotate`` / ``fwd.attend`` /
``fwd.kernels.deviation`` without passing a backend name or a bound along. The checked wrappers
(``apply_rope``, ``selected_attention``, ``kv_deviation``) take the same options by the same names (``backend=``,
``bound=``, ``reads_host=``) for direct callers such as the tests.

The engine's calls read no tensor values on the host: the positions and rows it passes are built from the
request's plan on the host, below the bound it gives, so the wrappers trust them instead of reading them back
(a device sync per call on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .attention import selected_attention
from .backend import resolve_backend
from .batch_decode import batch_decode_attention
from .decode_attention import decode_attention
from .deviation import kv_deviation
from .rotary import RopeTable, apply_rope


@dataclass(frozen=True)
class Kernels:
    """The blending kernels on one backend: ``"torch"`` (the references) or ``"triton"``.

    reads_host: the kernels may read index tensors on the host (the CPU fast paths of ``selected_attention``
    do; free on CPU, a sync on a GPU). ``Kernels.on`` sets it for CPU devices only; False makes CPU tensors take
    the code path a GPU takes (the tests that prove the layer loop never syncs use that).
    bound: None, or the largest position or row index any index tensor given to these kernels holds (the caller
    built them on the host and guarantees it): nothing is then read back to check them or to size the RoPE table.
    """

    backend: str
    reads_host: bool = True
    bound: int | None = None

    @classmethod
    def on(cls, backend: str, device: torch.device) -> Kernels:
        """Resolve ``backend`` (``auto``, ``torch`` or ``triton``) for tensors on ``device``; raises with the fix
        when Triton cannot run there."""
        return cls(resolve_backend(backend, device), reads_host=device.type == "cpu")

    def within(self, positions: int) -> Kernels:
        """These kernels for index tensors whose values all lie in [0, positions) (``bound = positions - 1``)."""
        if positions < 1:
            raise ValueError(f"positions must be >= 1, got {positions}")
        return replace(self, bound=positions - 1)

    def rope(self, x: torch.Tensor, positions: torch.Tensor, table: RopeTable, *, out=None) -> torch.Tensor:
        """x: [H, T, D] before RoPE; positions: [T] -> rotated [H, T, D] (into ``out`` if given)."""
        return apply_rope(x, positions, table, out=out, backend=self.backend, bound=self.bound)

    def attention(self, q, q_pos, k, v, scale: float) -> torch.Tensor:
        """q: [Hq, M, D] rotated at q_pos: [M], each in [0, N); k, v: [Hkv, N, D], key j at position j -> [Hq, M, D]."""
        return selected_attention(
            q, q_pos, k, v, scale, backend=self.backend, bound=self.bound, reads_host=self.reads_host
        )

    def decode_attention(self, q, pos, k, v, scale: float, *, length: int | None = None) -> torch.Tensor:
        """q: [Hq, 1, D] rotated at pos: [1] (device); k, v: [Hkv, N, D] -> [Hq, 1, D] over keys 0..pos."""
        return decode_attention(q, pos, k, v, scale, length=length, backend=self.backend)

    def batch_decode_attention(self, q, pos, k, v, scale: float, *, length: int | None = None) -> torch.Tensor:
        """q: [Hq, B, D] rotated at pos: [B] (device); k, v: [B, Hkv, N, D] -> [Hq, B, D], query b over its keys
        0..pos[b]."""
        return batch_decode_attention(q, pos, k, v, scale, length=length, backend=self.backend)

    def deviation(self, fresh, cached, from_cache, *, rows=None) -> torch.Tensor:
        """fresh: [H, M, D]; cached: [H, M, D] or [H, N, D] with ``rows``: [M]; from_cache: [M] -> [M] float32."""
        return kv_deviation(fresh, cached, from_cache, rows=rows, backend=self.backend, bound=self.bound)
