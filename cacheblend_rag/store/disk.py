"""Disk tier: one safetensors file per block, one tensor per layer for K and for V.

File ``<root>/<key[:2]>/<key>.safetensors`` holds tensors ``k.<l>``, ``v.<l>`` ([Hkv, T, D]) and string
metadata: format name and version, key, model fingerprint, shape, dtype and a CRC32 per tensor. Writes go
to a temporary file in the same folder, then ``os.replace``: a reader sees the old file, the new file, or
none, never a partial one. A file that fails any check (unreadable, truncated, wrong key, other model,
wrong shape, bad checksum) is a miss: it is logged, deleted, and recomputed by the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .chunk import ChunkKV
from .tier import TierStats

logger = logging.getLogger(__name__)

FORMAT = "cacheblend-kv"
FORMAT_VERSION = "1"


class CorruptEntry(Exception):
    """A stored entry failed validation."""


def tensor_crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy())


class DiskTier:
    name = "disk"

    def __init__(self, root: str | os.PathLike, model_fingerprint: str) -> None:
        self.root = Path(root).expanduser()
        self.model_fingerprint = model_fingerprint
        self.stats = TierStats()
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> ChunkKV | None:
        path = self.path(key)
        try:
            kv = self._read(path, key)
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except Exception as exc:
            logger.warning("KV cache file %s is unusable (%s); treating it as a miss and recomputing", path, exc)
            self._count(misses=1, corrupt=1)
            self.delete(key)
            return None
        self._count(hits=1, bytes_read=kv.nbytes)
        return kv

    def _read(self, path: Path, key: str) -> ChunkKV:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                raise CorruptEntry(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            if meta.get("key") != key:
                raise CorruptEntry("it holds another key")
            if meta.get("model_fingerprint") != self.model_fingerprint:
                raise CorruptEntry("it was written by another model")
            n_layers, n_heads, n_tokens, head_dim = json.loads(meta["shape"])
            crcs = json.loads(meta["crc"])
            names = [f"{kind}.{layer}" for kind in "kv" for layer in range(n_layers)]
            if sorted(f.keys()) != sorted(names) or len(crcs) != len(names):
                raise CorruptEntry("tensor names do not match its metadata")
            tensors = {}
            for name in names:
                t = f.get_tensor(name)
                if tuple(t.shape) != (n_heads, n_tokens, head_dim) or str(t.dtype) != meta["dtype"]:
                    raise CorruptEntry(f"tensor {name} has shape {tuple(t.shape)} / {t.dtype}")
                if tensor_crc(t) != crcs[name]:
                    raise CorruptEntry(f"checksum mismatch in {name}")
                tensors[name] = t
        k = torch.stack([tensors[f"k.{layer}"] for layer in range(n_layers)])
        v = torch.stack([tensors[f"v.{layer}"] for layer in range(n_layers)])
        return ChunkKV(k, v)

    def put(self, key: str, kv: ChunkKV) -> None:
        path = self.path(key)
        tensors = {}
        for layer in range(kv.n_layers):
            k, v = kv.layer(layer)
            tensors[f"k.{layer}"] = k.detach().to("cpu").contiguous()
            tensors[f"v.{layer}"] = v.detach().to("cpu").contiguous()
        first = tensors["k.0"]
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "key": key,
            "model_fingerprint": self.model_fingerprint,
            "shape": json.dumps([kv.n_layers, first.shape[0], first.shape[1], first.shape[2]]),
            "dtype": str(first.dtype),
            "crc": json.dumps({name: tensor_crc(t) for name, t in tensors.items()}),
        }
        tmp = path.parent / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not write KV cache file %s (%s); continuing without it", path, exc)
            tmp.unlink(missing_ok=True)
            return
        self._count(writes=1, bytes_written=path.stat().st_size if path.exists() else 0)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def files(self) -> list[Path]:
        return sorted(self.root.glob("??/*.safetensors")) if self.root.is_dir() else []

    def usage(self) -> dict[str, int]:
        files = self.files()
        return {"entries": len(files), "bytes": sum(f.stat().st_size for f in files)}

    def gc(self, max_bytes: int) -> dict[str, int]:
        """Delete least recently used files (by access, else modification time) until under ``max_bytes``."""
        entries = []
        for f in self.files():
            st = f.stat()
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, f))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        removed = freed = 0
        for _, size, f in entries:
            if total <= max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
            removed += 1
            freed += size
        cutoff = time.time() - 3600
        for stale in self.root.glob("??/.tmp-*") if self.root.is_dir() else []:
            if stale.stat().st_mtime < cutoff:  # left by a writer that died mid-way
                stale.unlink(missing_ok=True)
        return {"removed": removed, "freed_bytes": freed, "bytes": total}

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)
