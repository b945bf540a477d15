"""The chunk-KV store: tiers in order (fastest first), reads promote entries to the faster tiers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .chunk import ChunkKV
from .entry import encode_int8, read_or_miss
from .pipeline import LazyChunk, start_loader
from .tier import Tier

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


class KVStore:
    """Looks blocks up tier by tier; writes go to every tier.

    dtype: the stored dtype (default float16: 11 mantissa bits, twice bfloat16's precision). A block whose
    values overflow float16 is stored as bfloat16 instead. ``int8`` (or ``torch.int8``) stores keys with a
    per-channel and values with a per-token scale (``codec.py``): about half the bytes of float16 on disk and
    in Redis; every tier, memory included, serves the same decoded float16 values. ``expect`` = (layers,
    kv_heads, head_dim): an entry of any other geometry is treated as a miss and deleted, and so is one whose
    token count is not the one the caller asks for (``get(key, n_tokens)``, ``fetch(keys, n_tokens)``).
    pipelined: ``fetch`` reads blocks from tiers that serialize (disk, Redis) layer by layer in the
    background instead of whole before the prefill. layer_timeout_s: how long a prefill waits for one layer
    before the block counts as failed (the engine computes it instead).
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        dtype: torch.dtype | str = torch.float16,
        expect: tuple[int, int, int] | None = None,
        pipelined: bool = True,
        layer_timeout_s: float = 30.0,
    ) -> None:
        if not tiers:
            raise ValueError("a KVStore needs at least one tier")
        dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in _DTYPES.values():
            raise ValueError(f"store dtype must be float16, bfloat16, float32 or int8, got {dtype}")
        if layer_timeout_s <= 0:
            raise ValueError(f"layer_timeout_s must be > 0, got {layer_timeout_s}")
        self.tiers = list(tiers)
        self.dtype = dtype
        self.expect = expect
        self.pipelined = pipelined
        self.layer_timeout_s = layer_timeout_s

    def contains(self, key: str) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def get(self, key: str, n_tokens: int | None = None) -> ChunkKV | None:
        """The whole block (read before returning), promoted to the faster tiers; None on a miss. With
        ``n_tokens``, an entry of another token count is a miss (and deleted)."""
        for i, tier in enumerate(self.tiers):
            kv = self._read_whole(tier, key, n_tokens)
            if kv is not None:
                self._promote(i, key, kv)
                return kv
        return None

    def _read_whole(self, tier: Tier, key: str, n_tokens: int | None) -> ChunkKV | None:
        opener = getattr(tier, "open", None)
        if opener is None:
            kv = tier.get(key)
            if kv is not None and not self._fits(tuple(kv.k.shape), n_tokens):
                self._reject(tier, key, tuple(kv.k.shape), n_tokens)
                return None
            return kv
        reader = opener(key)  # a tier that serializes: its geometry is checked before a buffer of that shape exists
        if reader is None:
            return None
        if not self._fits(reader.meta.shape, n_tokens):
            reader.close()
            self._reject(tier, key, reader.meta.shape, n_tokens)
            return None
        return read_or_miss(reader)

    def fetch(
        self, keys: Sequence[str], n_tokens: Sequence[int | None] | None = None
    ) -> list[ChunkKV | LazyChunk | None]:
        """Per key: a ChunkKV from a fast tier, a LazyChunk being read in the background from a slow one
        (see ``pipeline.py``; a failed read raises ChunkReadError when the block is used), or None on a miss.
        Repeated keys get the same object. ``n_tokens``: per key, the token count its entry must have (an entry of
        another count is a miss, and deleted)."""
        tokens = dict(zip(keys, n_tokens)) if n_tokens is not None else {}
        if not self.pipelined:
            found = {key: self.get(key, tokens.get(key)) for key in dict.fromkeys(keys)}
            return [found[key] for key in keys]
        found: dict[str, ChunkKV | LazyChunk | None] = {}
        origin: dict[str, int] = {}
        lazy: list[LazyChunk] = []
        for key in keys:
            if key in found:
                continue
            found[key] = None
            want = tokens.get(key)
            for i, tier in enumerate(self.tiers):
                opener = getattr(tier, "open", None)
                if opener is None:
                    kv = tier.get(key)
                    if kv is not None and not self._fits(tuple(kv.k.shape), want):
                        self._reject(tier, key, tuple(kv.k.shape), want)
                    elif kv is not None:
                        self._promote(i, key, kv)
                        found[key] = kv
                        break
                    continue
                reader = opener(key)
                if reader is None:
                    continue
                if not self._fits(reader.meta.shape, want):  # before any buffer of that shape is allocated
                    reader.close()
                    self._reject(tier, key, reader.meta.shape, want)
                    continue
                found[key] = chunk = LazyChunk(key, reader, tier.name, self.layer_timeout_s)
                origin[key] = i
                lazy.append(chunk)
                break
        if lazy:
            start_loader(lazy, lambda key, kv: self._promote(origin[key], key, kv))
        return [found[key] for key in keys]

    def _promote(self, index: int, key: str, kv: ChunkKV) -> None:
        for faster in self.tiers[:index]:
            faster.put(key, kv)

    def _fits(self, shape: tuple[int, ...], n_tokens: int | None = None) -> bool:
        if n_tokens is not None and shape[2] != n_tokens:
            return False
        if self.expect is None:
            return True
        layers, heads, dim = self.expect
        return shape[0] == layers and shape[1] == heads and shape[3] == dim

    def _reject(self, tier: Tier, key: str, shape: tuple[int, ...], n_tokens: int | None = None) -> None:
        layers, heads, dim = self.expect or ("?", "?", "?")
        expected = (layers, heads, "?" if n_tokens is None else n_tokens, dim)
        logger.warning(
            "KV entry %s in the %s tier has shape %s, expected (layers, kv heads, tokens, head dim) = "
            "%s; treating it as a miss and deleting it",
            key[:12],
            tier.name,
            shape,
            expected,
        )
        tier.stats.add(corrupt=1)
        tier.delete(key)

    def put(self, key: str, kv: ChunkKV) -> ChunkKV:
        """Store ``kv`` (cast to the store dtype) in every tier; returns the stored form (on the device when a device
        tier on ``kv``'s device holds it, so a request that computed a missing block uses it without a copy).

        A device tier on the device ``kv`` was computed on gets the cast tensors as they are; every other tier gets
        one host copy (made once, and only if some tier needs it)."""
        cast = self._cast(kv)
        host: ChunkKV | None = None
        on_device = False
        for tier in self.tiers:
            device = getattr(tier, "device", None)
            if device is not None and cast.k.device == device and cast.packed is None:
                tier.put(key, cast)
                on_device = True
                continue
            if host is None:
                host = self._host(cast)
            tier.put(key, host)
        return cast if on_device or host is None else host

    def encode(self, kv: ChunkKV) -> ChunkKV:
        """``kv`` as the host tiers serve it: [L, Hkv, T, D] on the CPU in the store dtype (decoded int8)."""
        return self._host(self._cast(kv))

    def _cast(self, kv: ChunkKV) -> ChunkKV:
        """``kv`` in the store dtype, where it is (int8: quantized and decoded on the CPU, its packed form kept)."""
        if self.dtype == torch.int8:
            return encode_int8(ChunkKV(kv.k.detach().cpu(), kv.v.detach().cpu()))
        stored = kv.to(self.dtype)
        if self.dtype == torch.float16 and not (torch.isfinite(stored.k).all() and torch.isfinite(stored.v).all()):
            stored = kv.to(torch.bfloat16)
        return ChunkKV(stored.k.detach().contiguous(), stored.v.detach().contiguous())

    @staticmethod
    def _host(kv: ChunkKV) -> ChunkKV:
        if kv.k.device.type == "cpu":
            return kv
        return ChunkKV(kv.k.cpu(), kv.v.cpu())

    def delete(self, key: str) -> None:
        for tier in self.tiers:
            tier.delete(key)

    def stats(self) -> dict[str, dict[str, int]]:
        return {tier.name: tier.stats.snapshot() for tier in self.tiers}
