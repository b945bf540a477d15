"""Disk tier: one safetensors file per block, one tensor per layer for K and for V.

File ``<root>/<key[:2]>/<key>.safetensors`` holds the tensors and string metadata of ``entry.py`` (format
and version, key, model fingerprint, shape, dtype, codec, a CRC32 per tensor). Writes go to a temporary file
in the same folder, then ``os.replace``: a reader sees the old file, the new file, or none, never a partial
one. A reader keeps the file it opened (its descriptor) for the whole read, so a concurrent replace or
delete cannot mix two files. ``open`` parses the header and checks the metadata and that every tensor lies
inside the file; ``read_layer`` reads one layer's tensors straight into the caller's buffers with
``pread`` and checks each one's CRC. A file that fails any check is a miss: it is logged, deleted (unless a
newer file replaced it meanwhile), and recomputed by the caller; so is anything at an entry's path that is
not a regular file (a FIFO is opened non-blocking, so it cannot hang a request). Files are not fsynced: after
a power loss a file may be empty or truncated, which the checks catch. A write that fails (disk full,
read-only file system, ...) is skipped: counted in the tier's ``errors``, logged at most once a minute, and
the request goes on without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import struct
import threading
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from .chunk import ChunkKV
from .entry import CorruptEntry, EntryMeta, LayerReaderBase, encode_entry, read_or_miss, tensor_bytes, tensor_crc
from .tier import TierStats

logger = logging.getLogger(__name__)

__all__ = ["CorruptEntry", "DiskTier", "tensor_crc"]

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I8": torch.int8}
_MAX_HEADER = 16 << 20
WARN_EVERY_S = 60.0  # at most one "could not write" warning per this many seconds


class DiskTier:
    name = "disk"

    def __init__(self, root: str | os.PathLike, model_fingerprint: str) -> None:
        self.root = Path(root).expanduser()
        self.model_fingerprint = model_fingerprint
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._last_write_warning = -float("inf")
        self._failed_writes = 0  # since the last warning

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def open(self, key: str) -> _DiskReader | None:
        """A per-layer reader of ``key``'s file (header validated), or None on a miss."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there must not block the request
        except FileNotFoundError:
            self.stats.add(misses=1)
            return None
        except OSError as exc:
            logger.warning("cannot open KV cache file %s (%s); treating it as a miss", path, exc)
            self.stats.add(misses=1, errors=1)
            return None
        try:
            return _DiskReader(self, key, path, fd)
        except Exception as exc:
            self._unusable(path, fd, exc)
            os.close(fd)
            return None

    def get(self, key: str) -> ChunkKV | None:
        return read_or_miss(self.open(key))

    def _unusable(self, path: Path, fd: int, exc: BaseException) -> None:
        """Log, count and delete a bad file, unless ``path`` now names another (newer) file than ``fd``."""
        if not isinstance(exc, OSError):  # bad content, not a failing device
            logger.warning("KV cache file %s is unusable (%s); treating it as a miss and recomputing", path, exc)
            self.stats.add(misses=1, corrupt=1)
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    path.unlink()
        else:
            logger.warning("could not read KV cache file %s (%s); treating it as a miss", path, exc)
            self.stats.add(misses=1, errors=1)

    def put(self, key: str, kv: ChunkKV) -> None:
        """Write ``key``'s file. A failed write (disk full, read-only, ...) is skipped: counted in ``errors``,
        logged at most once a minute, and the caller goes on without it."""
        path = self.path(key)
        meta, tensors = encode_entry(key, self.model_fingerprint, kv)
        tmp = path.parent / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta.to_strings())
            size = os.stat(tmp).st_size  # before the replace: a cleaner may delete the file right after it
            os.replace(tmp, path)
        except Exception as exc:  # OSError, and safetensors' SafetensorError ("No space left on device", ...)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._write_failed(path, exc)
            return
        self.stats.add(writes=1, bytes_written=size)

    def _write_failed(self, path: Path, exc: BaseException) -> None:
        now = time.monotonic()
        self.stats.add(errors=1)
        with self._lock:
            self._failed_writes += 1
            if now - self._last_write_warning < WARN_EVERY_S:
                return
            self._last_write_warning = now
            failed, self._failed_writes = self._failed_writes, 0
        logger.warning(
            "could not write KV cache file %s (%s: %s); continuing without it. [%d failed writes since "
            "the last warning; this warning repeats at most every %gs]",
            path,
            type(exc).__name__,
            exc,
            failed,
            WARN_EVERY_S,
        )

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def files(self) -> list[Path]:
        return sorted(self.root.glob("??/*.safetensors")) if self.root.is_dir() else []

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """(path, stat) of every entry that is a regular file now; dangling symlinks, FIFOs and other odd
        files, and files deleted while the folder is scanned, are skipped."""
        out = []
        for f in self.files():
            try:
                st = f.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((f, st))
        return out

    def usage(self) -> dict[str, int]:
        entries = self.entries()
        return {"entries": len(entries), "bytes": sum(st.st_size for _, st in entries)}

    def gc(self, max_bytes: int) -> dict[str, int]:
        """Delete least recently used files (by access, else modification time) until under ``max_bytes``."""
        entries = sorted((max(st.st_atime, st.st_mtime), st.st_size, f) for f, st in self.entries())
        total = sum(size for _, size, _ in entries)
        removed = freed = 0
        for _, size, f in entries:
            if total <= max_bytes:
                break
            try:
                f.unlink()
            except FileNotFoundError:  # removed meanwhile (another gc, a cleaner): it is gone all the same
                pass
            except OSError as exc:
                logger.warning("could not delete KV cache file %s (%s)", f, exc)
                continue
            total -= size
            removed += 1
            freed += size
        cutoff = time.time() - 3600
        for stale in self.root.glob("??/.tmp-*") if self.root.is_dir() else []:
            with contextlib.suppress(OSError):
                if stale.lstat().st_mtime < cutoff:  # left by a writer that died mid-way
                    stale.unlink()
        return {"removed": removed, "freed_bytes": freed, "bytes": total}


class _DiskReader(LayerReaderBase):
    """One opened file: its validated header, read layer by layer with ``pread`` (thread-safe, no seek)."""

    def __init__(self, tier: DiskTier, key: str, path: Path, fd: int) -> None:
        self.tier, self.path, self.fd = tier, path, fd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntry("not a regular file")
        size = st.st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CorruptEntry(f"{size} bytes: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CorruptEntry(f"header length {header_len} does not fit in the file ({size} bytes)")
        header = json.loads(os.pread(fd, header_len, 8))
        if not isinstance(header, dict):
            raise CorruptEntry("the header is not a JSON object")
        self.meta = EntryMeta.parse(header.pop("__metadata__", None) or {}, key, tier.model_fingerprint)
        if sorted(header) != sorted(self.meta.names()):
            raise CorruptEntry("tensor names do not match its metadata")
        specs = self.meta.specs()
        base = 8 + header_len
        self.offsets: dict[str, int] = {}
        for name, info in header.items():
            shape, dtype = specs[name.split(".")[0]]
            begin, end = info["data_offsets"]
            if _ST_DTYPES.get(info["dtype"]) != dtype or tuple(info["shape"]) != shape:
                raise CorruptEntry(f"tensor {name} is {info['shape']} {info['dtype']}, expected {shape} {dtype}")
            if end - begin != dtype.itemsize * _numel(shape) or base + end > size:
                raise CorruptEntry(f"tensor {name} lies outside the file ({size} bytes): truncated")
            self.offsets[name] = base + begin

    def read_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None:
        # out: short name -> contiguous tensor of the spec's shape and dtype, filled in place
        self._checked_fill(layer, out)

    def _fill(self, layer: int, out: dict[str, torch.Tensor], values=None) -> None:
        for short, t in out.items():
            name = f"{short}.{layer}"
            view = tensor_bytes(t)
            n = os.preadv(self.fd, [view], self.offsets[name])
            if n != view.nbytes:
                raise CorruptEntry(f"tensor {name}: read {n} of {view.nbytes} bytes (file truncated)")
            self.meta.check(name, t)

    def _discard(self, exc: BaseException) -> None:
        self.tier._unusable(self.path, self.fd, exc)

    def _release(self) -> None:
        os.close(self.fd)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n
