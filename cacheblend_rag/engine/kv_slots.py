"""The KV memory of a decode batch: a pool of fixed-size slots, one sequence each, kept compact.

k, v: ``[slots + 1, L, Hkv, capacity, D]``. Slot i is laid out as a ``KVCache`` (``cache(i)`` is one, a view),
key j at position j, keys rotated. The occupied slots are always 0..count-1: a sequence that leaves is replaced by
the last one (one copy of that sequence's filled rows), so the batch's caches at layer l are the one strided view
``k[:count, l]`` that a single attention call reads (``kernels/batch_decode.py``), and a CUDA graph captured
over ``k[:n]`` stays valid whoever occupies the slots. The extra slot at index ``scratch`` holds no sequence: the
padding rows of a CUDA graph's batch write there, so they never touch a free slot (which a prefill may be
filling).

The pool is zero-filled once: attention over a slot reads rows up to the batch's longest sequence (masked past
the slot's own length), and those rows must hold finite numbers (0 x NaN is NaN).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class KVSlots:
    """``slots`` sequences of up to ``capacity`` rows each; ``lengths[i]``: rows filled in slot i (host ints)."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV pool needs slots >= 1 and capacity >= 1, got slots={slots}, capacity={capacity}")
        shape = (slots + 1, n_layers, n_kv_heads, capacity, head_dim)  # the last one: scratch
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths: list[int] = []

    @classmethod
    def for_model(cls, fwd, slots: int, capacity: int) -> KVSlots:
        """A pool shaped for ``fwd`` (a ModelForward), in its dtype and on its device."""
        return cls(fwd.n_layers, fwd.n_kv_heads, fwd.head_dim, slots, capacity, fwd.dtype, fwd.device)

    @staticmethod
    def slot_bytes(fwd, capacity: int) -> int:
        """Bytes of one slot of ``capacity`` rows for ``fwd``'s model: what admission by KV memory counts (a pool of
        n slots takes n + 1 of them: one is scratch)."""
        itemsize = torch.empty((), dtype=fwd.dtype).element_size()
        return 2 * fwd.n_layers * fwd.n_kv_heads * capacity * fwd.head_dim * itemsize

    @property
    def slots(self) -> int:
        """How many sequences the pool holds."""
        return self.k.shape[0] - 1

    @property
    def scratch(self) -> int:
        """The index of the slot no sequence occupies (where padding rows write)."""
        return self.k.shape[0] - 1

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def count(self) -> int:
        """Occupied slots: 0..count-1."""
        return len(self.lengths)

    def cache(self, slot: int) -> KVCache:
        """Slot ``slot`` as a KVCache (a view: writes go to the pool)."""
        self._check(slot)
        return KVCache.of(self.k[slot], self.v[slot], self.lengths[slot])

    def add(self, cache: KVCache, room: int = 0) -> int:
        """Copy ``cache``'s filled rows into the next slot and return its index; ``room``: rows the sequence will
        still append (its length plus room must fit in a slot)."""
        if self.count == self.slots:
            raise RuntimeError(f"all {self.slots} KV slots are taken; remove a sequence first or make more slots")
        n = cache.length
        if n + room > self.capacity:
            raise ValueError(
                f"a sequence of {n} rows that may grow by {room} does not fit in a slot of {self.capacity} rows; "
                "make the slots larger or lower its max_new_tokens"
            )
        if cache.k.shape[:2] != self.k.shape[1:3] or cache.k.shape[3] != self.k.shape[4]:
            raise ValueError(f"a cache of shape {tuple(cache.k.shape)} does not fit slots of {tuple(self.k.shape[1:])}")
        if cache.k.dtype != self.k.dtype or cache.k.device != self.k.device:
            raise ValueError(
                f"the cache is {cache.k.dtype} on {cache.k.device}, the slots {self.k.dtype} on {self.k.device}"
            )
        slot = self.count
        self.k[slot, :, :, :n].copy_(cache.k[:, :, :n])
        self.v[slot, :, :, :n].copy_(cache.v[:, :, :n])
        self.lengths.append(n)
        return slot

    def remove(self, slot: int) -> int | None:
        """Free ``slot``; the last occupied slot moves into it. Returns the index the moved sequence had (None when
        ``slot`` was the last, so nothing moved)."""
        self._check(slot)
        last = self.count - 1
        if slot == last:
            self.lengths.pop()
            return None
        n = self.lengths[last]
        self.k[slot, :, :, :n].copy_(self.k[last, :, :, :n])
        self.v[slot, :, :, :n].copy_(self.v[last, :, :, :n])
        self.lengths[slot] = self.lengths.pop()
        return last

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.count:
            raise IndexError(f"slot {slot} is not occupied (slots 0..{self.count - 1} are)")
