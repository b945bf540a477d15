"""The interface every store tier implements, and its counters."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Protocol

from .chunk import ChunkKV


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0  # failed I/O or connection attempts (entries kept; the tier may back off)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add to counters by name (``stats.add(misses=1, errors=1)``); safe from any thread."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class Tier(Protocol):
    """A store tier. Tiers that serialize (disk, Redis) also have ``open(key) -> EntryReader | None``, which
    lets the store read an entry layer by layer while the prefill runs (see ``pipeline.py``)."""

    name: str
    stats: TierStats

    def contains(self, key: str) -> bool: ...

    def get(self, key: str) -> ChunkKV | None: ...

    def put(self, key: str, kv: ChunkKV) -> None: ...

    def delete(self, key: str) -> None: ...
