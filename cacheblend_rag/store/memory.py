"""In-memory tiers: an LRU of ChunkKV bounded by bytes, in host memory (pageable or pinned) or on a device.

``MemoryTier()`` holds entries in ordinary host memory. ``MemoryTier(pin=True)`` holds them in page-locked
host memory when CUDA is present (a copy from it to the GPU is a DMA that can run on a side stream while the
GPU computes; ``engine/transfer.py`` streams such entries layer by layer); without CUDA pinning means nothing
and the tier behaves like the plain one. ``MemoryTier(device="cuda")`` is the device-resident hot tier: its
entries live in GPU memory, so a hit copies nothing across PCIe. URLs: ``memory://?max_bytes=2GB``,
``memory://?pin=1&max_bytes=64GB``, ``memory://?device=cuda&max_bytes=40GB`` (no ``max_bytes``: a share of the
device's free memory, ``default_device_bytes``).

Every tier keeps to its own byte budget by evicting the least recently used entries. A pinned tier counts an
entry at what page-locked memory it takes (torch rounds each pinned block up to a power of two); torch keeps
the blocks of evicted entries cached for reuse by later ones rather than unpinning them. The store writes every
entry to every tier and promotes a read from a slower tier into the faster ones (``kvstore.py``), so an entry
evicted from the device tier is still in the host tiers below it, and comes back to the device on its next use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .chunk import ChunkKV
from .tier import TierStats

DEVICE_SHARE = 0.3  # the device tier's default budget: this share of the device's free memory when it is made


def default_device_bytes(device: torch.device) -> int:
    """The device tier's budget when none is given: DEVICE_SHARE of the free memory of ``device`` now (after the
    model is loaded, the engine's store is built after it), leaving the rest to prefill workspaces."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_SHARE)


def pinned_bytes(nbytes: int) -> int:
    """Page-locked bytes ``torch.Tensor.pin_memory`` takes for ``nbytes``: its caching host allocator rounds each
    block up to a power of two (``CachingHostAllocator.h``, at torch's default ``pinned_max_round_threshold``)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device (None: host memory); a clear error if it names CUDA and there is none."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown memory tier device {device!r}; use device=cpu or device=cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"memory tier device={device} needs CUDA, which this torch does not see (torch.cuda.is_available() is "
            "False); drop device= (host memory) or use device=cpu, or run where a CUDA GPU and a CUDA torch are"
        )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return None if dev.type == "cpu" else dev


class MemoryTier:
    """LRU cache of ChunkKV; never holds more than ``max_bytes`` (an entry larger than that is not kept).

    device: None or "cpu" (host memory), or a GPU ("cuda", "cuda:1"): entries are copied there when stored.
    pin: keep host entries in page-locked memory (only when CUDA is available; otherwise ignored).
    max_bytes: the budget; None for a device tier means ``default_device_bytes``, for a host tier 2 GiB.
    """

    def __init__(self, max_bytes: int | None = 2 << 30, *, device: str | torch.device | None = None, pin: bool = False):
        self.device = resolve_device(device)
        if max_bytes is None:
            max_bytes = default_device_bytes(self.device) if self.device is not None else 2 << 30
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.pin = bool(pin) and self.device is None and torch.cuda.is_available()
        self.name = "device" if self.device is not None else "pinned" if pin else "memory"
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
        size = self._footprint(kv)
        if size > self.max_bytes:  # checked before any copy to the device
            self.delete(key)
            return
        kv = self._placed(kv)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._footprint(old)
            while self._items and self._bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= self._footprint(evicted)
                self.stats.add(evictions=1)
            self._items[key] = kv
            self._bytes += size
            self.stats.add(writes=1, bytes_written=size)

    def _footprint(self, kv: ChunkKV) -> int:
        """The bytes ``kv`` takes in this tier (its decoded form): in pinned memory, what torch's caching host
        allocator takes for it, which rounds every block up to a power of two (up to twice the tensor's bytes)."""
        sizes = (kv.k.numel() * kv.k.element_size(), kv.v.numel() * kv.v.element_size())
        return sum(pinned_bytes(n) for n in sizes) if self.pin else sum(sizes)

    def _placed(self, kv: ChunkKV) -> ChunkKV:
        """``kv`` as this tier holds it: decoded (the int8 form is only for tiers that serialize), on the device,
        or in pinned host memory."""
        k, v = kv.k, kv.v
        if self.device is not None:
            k, v = k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
        elif k.device.type != "cpu":
            k, v = k.cpu(), v.cpu()
        if self.pin and not k.is_pinned():
            k, v = k.pin_memory(), v.pin_memory()
        return ChunkKV(k, v)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._footprint(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
