"""The interface every store tier implements, and its counters."""

from __future__ import annotations

from typing import Protocol

from ..counters import Counters
from .chunk import ChunkKV


class TierStats(Counters):
    """A tier's counters (``stats.add(misses=1, errors=1)`` from any thread). errors: failed I/O or connection
    attempts (entries kept; the tier may back off)."""

    FIELDS = ("hits", "misses", "corrupt", "bytes_read", "writes", "bytes_written", "evictions", "errors")


class Tier(Protocol):
    """A store tier. Tiers that serialize (disk, Redis) also have ``open(key) -> EntryReader | None``, which
    lets the store read an entry layer by layer while the prefill runs (see ``pipeline.py``)."""

    name: str
    stats: TierStats

    def contains(self, key: str) -> bool: ...

    def get(self, key: str) -> ChunkKV | None: ...

    def put(self, key: str, kv: ChunkKV) -> None: ...

    def delete(self, key: str) -> None: ...
