"""The chunk-KV store: tiers in order (fastest first), reads promote entries to the faster tiers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from .chunk import ChunkKV
from .tier import Tier

logger = logging.getLogger(__name__)


class KVStore:
    """Looks blocks up tier by tier; writes go to every tier.

    dtype: the stored dtype (default float16: 11 mantissa bits, twice bfloat16's precision). A block whose
    values overflow float16 is stored as bfloat16 instead. ``expect`` = (layers, kv_heads, head_dim): an
    entry of any other geometry is treated as a miss.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        dtype: torch.dtype = torch.float16,
        expect: tuple[int, int, int] | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a KVStore needs at least one tier")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"store dtype must be float16, bfloat16 or float32, got {dtype}")
        self.tiers = list(tiers)
        self.dtype = dtype
        self.expect = expect
        self._lock = threading.Lock()

    def contains(self, key: str) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def get(self, key: str) -> ChunkKV | None:
        for i, tier in enumerate(self.tiers):
            kv = tier.get(key)
            if kv is None:
                continue
            if not self._fits(kv):
                logger.warning("KV entry %s in the %s tier has shape %s, expected %s; treating it as a miss",
                               key[:12], tier.name, tuple(kv.k.shape), self.expect)  # fmt: skip
                tier.stats.corrupt += 1
                tier.delete(key)
                continue
            for faster in self.tiers[:i]:
                faster.put(key, kv)
            return kv
        return None

    def _fits(self, kv: ChunkKV) -> bool:
        if self.expect is None:
            return True
        layers, heads, dim = self.expect
        return kv.k.shape[0] == layers and kv.k.shape[1] == heads and kv.k.shape[3] == dim

    def put(self, key: str, kv: ChunkKV) -> ChunkKV:
        """Store ``kv`` (cast to the store dtype) in every tier; returns the stored form."""
        stored = self.encode(kv)
        for tier in self.tiers:
            tier.put(key, stored)
        return stored

    def encode(self, kv: ChunkKV) -> ChunkKV:
        stored = kv.to(self.dtype)
        if self.dtype == torch.float16 and not (torch.isfinite(stored.k).all() and torch.isfinite(stored.v).all()):
            stored = kv.to(torch.bfloat16)
        return ChunkKV(stored.k.detach().cpu().contiguous(), stored.v.detach().cpu().contiguous())

    def delete(self, key: str) -> None:
        for tier in self.tiers:
            tier.delete(key)

    def stats(self) -> dict[str, dict[str, int]]:
        return {tier.name: tier.stats.as_dict() for tier in self.tiers}
