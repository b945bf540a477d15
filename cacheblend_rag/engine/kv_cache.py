"""The fused KV cache of one request: keys after RoPE, ordered by absolute position."""

from __future__ import annotations

import torch


class KVCache:
    """k, v: [L, Hkv, capacity, D]; rows 0..length-1 are filled (key j at position j)."""

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, fwd, capacity: int) -> KVCache:
        """An empty cache of ``capacity`` rows shaped for ``fwd`` (a ModelForward), in its dtype and device."""
        return cls(fwd.n_layers, fwd.n_kv_heads, fwd.head_dim, capacity, fwd.dtype, fwd.device)

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, length: int = 0) -> KVCache:
        """A cache over existing tensors k, v: [L, Hkv, capacity, D] (e.g. a slot of ``KVSlots``), not copied."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must be one [L, Hkv, capacity, D] shape, got {tuple(k.shape)}, {tuple(v.shape)}")
        if not 0 <= length <= k.shape[2]:
            raise ValueError(f"length {length} outside [0, {k.shape[2]}]")
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length = k, v, length
        return cache

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def truncate(self, length: int) -> None:
        """Forget rows from ``length`` on (decoding from there overwrites them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        self.length = length

    def layer(self, index: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [Hkv, length, D] of one layer's keys and values."""
        n = self.length if length is None else length
        return self.k[index, :, :n], self.v[index, :, :n]
