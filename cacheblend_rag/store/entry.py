"""The serialized form of one stored block, shared by the tiers that serialize (disk, Redis).

An entry is string metadata plus one tensor per (name, layer), named ``<name>.<layer>``:
- codec ``none``: ``k``, ``v`` [Hkv, T, D] in the entry's dtype;
- codec ``int8``: ``k``, ``v`` int8 [Hkv, T, D], ``ks`` float32 [Hkv, 1, D], ``vs`` float32 [Hkv, T, 1].
Metadata: format name and version ("1": codec none, the original disk format; "2": adds ``codec``), key,
model fingerprint, shape [L, Hkv, T, D], dtype (of the decoded tensors), CRC32 of every tensor. A reader
checks the metadata when it opens an entry and each tensor's shape, dtype and CRC when it reads that
tensor's layer, so one layer can be fetched and validated alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from .chunk import ChunkKV
from .codec import CODECS, PackedKV, dequantize, quantize_int8

FORMAT = "cacheblend-kv"
DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32)}
_HUGE_MIN = 4 << 20


class CorruptEntry(Exception):
    """A stored entry failed validation: it must never be used, and is deleted."""


class TierUnavailable(Exception):
    """A tier could not be reached (I/O or connection error, or backing off after one): a miss, not corrupt."""


try:  # ISA-L's CRC32 gives zlib's values 4-6x faster (pip install isal); every read checks every byte
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32

CRC32 = f"{_crc32.__module__}.crc32"


def tensor_crc(t: torch.Tensor) -> int:
    """zlib's CRC32 of the tensor's bytes (the values are the same whichever library computes them)."""
    return _crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_bytes(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous tensor's memory (any dtype, bfloat16 included)."""
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class EntryMeta:
    key: str
    model_fingerprint: str
    shape: tuple[int, int, int, int]  # [L, Hkv, T, D]
    dtype: torch.dtype  # of the decoded k and v
    codec: str
    crc: Mapping[str, int]

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded k and v."""
        layers, heads, tokens, dim = self.shape
        return 2 * layers * heads * tokens * dim * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """Bytes of every stored tensor (the int8 form and its scales with the int8 codec)."""
        return self.n_layers * sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.specs().values())

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-layer tensors: short name -> (shape, dtype)."""
        _, heads, tokens, dim = self.shape
        if self.codec == "none":
            return {"k": ((heads, tokens, dim), self.dtype), "v": ((heads, tokens, dim), self.dtype)}
        return {
            "k": ((heads, tokens, dim), torch.int8),
            "v": ((heads, tokens, dim), torch.int8),
            "ks": ((heads, 1, dim), torch.float32),
            "vs": ((heads, tokens, 1), torch.float32),
        }

    def names(self) -> list[str]:
        return [f"{name}.{layer}" for name in self.specs() for layer in range(self.n_layers)]

    def check(self, name: str, t: torch.Tensor) -> None:
        """Raise CorruptEntry unless tensor ``name`` (e.g. ``k.3``) has its shape, dtype and CRC."""
        shape, dtype = self.specs()[name.split(".")[0]]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CorruptEntry(f"tensor {name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        if tensor_crc(t) != self.crc[name]:
            raise CorruptEntry(f"checksum mismatch in {name}")

    def to_strings(self) -> dict[str, str]:
        out = {
            "format": FORMAT,
            "version": "1" if self.codec == "none" else "2",
            "key": self.key,
            "model_fingerprint": self.model_fingerprint,
            "shape": json.dumps(list(self.shape)),
            "dtype": str(self.dtype),
            "crc": json.dumps(dict(self.crc)),
        }
        if self.codec != "none":
            out["codec"] = self.codec
        return out

    @classmethod
    def parse(cls, meta: Mapping[str, str], key: str, model_fingerprint: str) -> EntryMeta:
        """Validated metadata of the entry stored under ``key``; CorruptEntry if it is not ours or malformed."""
        if meta.get("format") != FORMAT or meta.get("version") not in ("1", "2"):
            raise CorruptEntry(f"format {meta.get('format')!r} version {meta.get('version')!r}")
        if meta.get("key") != key:
            raise CorruptEntry("it holds another key")
        if meta.get("model_fingerprint") != model_fingerprint:
            raise CorruptEntry("it was written by another model")
        codec = meta.get("codec", "none") if meta["version"] == "2" else "none"
        try:
            shape = tuple(int(x) for x in json.loads(meta["shape"]))
            crc = {str(k): int(v) for k, v in json.loads(meta["crc"]).items()}
            dtype = DTYPES[meta["dtype"]]
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CorruptEntry(f"malformed metadata ({exc!r})") from None
        if codec not in CODECS or len(shape) != 4 or min(shape) < 1:
            raise CorruptEntry(f"codec {codec!r} / shape {shape} is not valid")
        entry = cls(key, model_fingerprint, shape, dtype, codec, crc)  # type: ignore[arg-type]
        if sorted(crc) != sorted(entry.names()):
            raise CorruptEntry("its checksums do not name the tensors its shape and codec call for")
        return entry


def encode_entry(key: str, model_fingerprint: str, kv: ChunkKV) -> tuple[EntryMeta, dict[str, torch.Tensor]]:
    """Metadata and named CPU tensors of ``kv`` (its int8 form if it has one)."""
    packed = kv.packed
    if packed is not None:
        parts = {"k": packed.k, "v": packed.v, "ks": packed.k_scale, "vs": packed.v_scale}
        dtype, codec = packed.dtype, "int8"
    else:
        parts, dtype, codec = {"k": kv.k, "v": kv.v}, kv.k.dtype, "none"
    if dtype not in DTYPES.values():
        raise ValueError(f"stored KV must be float16, bfloat16 or float32, got {dtype}")
    tensors = {
        f"{name}.{layer}": t[layer].detach().to("cpu").contiguous()
        for name, t in parts.items()
        for layer in range(kv.n_layers)
    }
    crc = {name: tensor_crc(t) for name, t in tensors.items()}
    meta = EntryMeta(key, model_fingerprint, tuple(kv.k.shape), dtype, codec, crc)  # type: ignore[arg-type]
    return meta, tensors


class EntryReader(Protocol):
    """An opened entry of a serializing tier (metadata already validated)."""

    meta: EntryMeta

    def read_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None:
        """Fill ``out`` (short name -> contiguous tensor of the spec's shape and dtype) with ``layer``'s tensors,
        each validated; raise CorruptEntry (the tier has deleted the entry) or TierUnavailable."""
        ...

    def close(self) -> None:
        """Release the entry; counts a hit if every layer was read."""
        ...


class LayerReaderBase:
    """What the disk and Redis readers share: a failed layer marks the entry unusable and closes the reader;
    ``close`` is idempotent and counts a hit (with the entry's bytes) only if every layer was read.

    Subclasses set ``tier`` (with ``stats``, a TierStats) and ``meta``, fill one layer in ``_fill``, say how to
    discard the entry in ``_discard`` and release what they hold in ``_release``."""

    tier: object
    meta: EntryMeta
    _read = 0
    _closed = False

    def _fill(self, layer: int, out: dict[str, torch.Tensor], values=None) -> None:
        raise NotImplementedError

    def _discard(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _checked_fill(self, layer: int, out: dict[str, torch.Tensor], values=None) -> None:
        try:
            self._fill(layer, out, values)
        except Exception as exc:
            self._discard(exc)
            self.close()
            raise
        self._read += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
        if self._read == self.meta.n_layers:
            self.tier.stats.add(hits=1, bytes_read=self.meta.nbytes)  # type: ignore[attr-defined]


class LayerBatcher(Protocol):
    """Optional (a reader's ``batcher`` attribute): reads one layer of several entries of one tier at once,
    e.g. one Redis round trip for a whole request instead of one per block."""

    def read_layers(self, items: list[tuple[EntryReader, dict[str, torch.Tensor]]], layer: int) -> list:
        """Like ``read_layer`` for each (reader, out); returns per item None or the exception it raised."""
        ...


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, but a large buffer gets transparent huge pages where the OS offers them (THP "madvise"
    mode): filling 140 MB of fresh 4 KiB pages costs a page fault each, about 2x the time of the copy itself."""
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes < _HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps ``buf`` alive


class EntryBuffers:
    """The decoded k and v ([L, Hkv, T, D]) of an entry being read, layer by layer, straight into place."""

    def __init__(self, meta: EntryMeta) -> None:
        self.meta = meta
        self.k = empty(meta.shape, meta.dtype)
        self.v = empty(meta.shape, meta.dtype)
        self.packed = PackedKV.empty(meta.shape, meta.dtype) if meta.codec == "int8" else None

    def slots(self, layer: int) -> dict[str, torch.Tensor]:
        """Where a reader puts ``layer``'s stored tensors (short name -> contiguous view of the buffers)."""
        p = self.packed
        if p is None:
            return {"k": self.k[layer], "v": self.v[layer]}
        return {"k": p.k[layer], "v": p.v[layer], "ks": p.k_scale[layer], "vs": p.v_scale[layer]}

    def decode(self, layer: int) -> None:
        """After ``layer``'s slots are filled: decode them into k and v (nothing to do without a codec)."""
        p = self.packed
        if p is not None:
            self.k[layer] = dequantize(p.k[layer], p.k_scale[layer], p.dtype)
            self.v[layer] = dequantize(p.v[layer], p.v_scale[layer], p.dtype)

    def read(self, reader: EntryReader, layer: int) -> None:
        reader.read_layer(layer, self.slots(layer))
        self.decode(layer)

    def kv(self) -> ChunkKV:
        return ChunkKV(self.k, self.v, packed=self.packed)


def read_entry(reader: EntryReader) -> ChunkKV:
    """Every layer of an opened entry (the reader is closed afterwards)."""
    try:
        prefetch = getattr(reader, "prefetch", None)  # a tier that can send the whole entry in one round trip
        if prefetch is not None:
            prefetch()
        buffers = EntryBuffers(reader.meta)
        for layer in range(reader.meta.n_layers):
            buffers.read(reader, layer)
    finally:
        reader.close()
    return buffers.kv()


def read_or_miss(reader: EntryReader | None) -> ChunkKV | None:
    """Every layer of an opened entry, or None if there is none or its read fails (the tier's reader has
    logged and counted the failure, and deleted a corrupt entry): the whole-entry read of every tier."""
    if reader is None:
        return None
    try:
        return read_entry(reader)
    except Exception:
        return None


def encode_int8(kv: ChunkKV) -> ChunkKV:
    """``kv`` quantized to int8 and decoded again, with its int8 form attached (what every tier will serve)."""
    packed = quantize_int8(kv.k, kv.v)
    k = dequantize(packed.k, packed.k_scale, packed.dtype)
    v = dequantize(packed.v, packed.v_scale, packed.dtype)
    return ChunkKV(k, v, packed=packed)
