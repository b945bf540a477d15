"""In-memory tier: an LRU of ChunkKV bounded by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

from .chunk import ChunkKV
from .tier import TierStats


class MemoryTier:
    """LRU cache of ChunkKV; never holds more than ``max_bytes`` (an entry larger than that is not kept)."""

    name = "memory"

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.stats = TierStats()
        self._items: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def contains(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            kv = self._items.get(key)
            if kv is None:
                self.stats.add(misses=1)
                return None
            self._items.move_to_end(key)
            self.stats.add(hits=1, bytes_read=kv.nbytes)
            return kv

    def put(self, key: str, kv: ChunkKV) -> None:
        if kv.packed is not None:  # the int8 form is only for tiers that serialize; keep the budget honest
            kv = ChunkKV(kv.k, kv.v)
        size = kv.nbytes
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            while self._items and self._bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.add(evictions=1)
            self._items[key] = kv
            self._bytes += size
            self.stats.add(writes=1, bytes_written=size)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
