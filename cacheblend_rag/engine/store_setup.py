"""The engine's chunk-KV store, from what ``CacheBlendEngine(store=...)`` was given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..store import DiskTier, KVStore, MemoryTier, tier_from_url

StoreSpec = KVStore | Sequence[object] | None


def build_store(
    spec: StoreSpec,
    fingerprint: str,
    cache_dir: Path,
    memory_bytes: int,
    dtype: torch.dtype,
    expect,
    device: torch.device | None = None,
) -> KVStore:
    """A KVStore from ``spec``: a KVStore (kept; its ``expect`` filled in), a list of tiers or tier URLs, or None
    (a memory tier of ``memory_bytes`` in front of a disk tier under ``cache_dir/kv``; for a model on CUDA, a
    device tier (a share of the free GPU memory) in front of a pinned host tier of ``memory_bytes`` and the disk)."""
    if isinstance(spec, KVStore):
        spec.expect = spec.expect or expect
        return spec
    if spec is None:
        tiers = [MemoryTier(memory_bytes), DiskTier(cache_dir / "kv", fingerprint)]
        if device is not None and device.type == "cuda":
            tiers = [MemoryTier(None, device=device), MemoryTier(memory_bytes, pin=True), tiers[1]]
    elif isinstance(spec, (str, bytes)):
        raise TypeError("store must be a list of tier URLs or tiers, e.g. store=['memory://?max_bytes=2GB']")
    else:
        tiers = [tier_from_url(t, fingerprint) if isinstance(t, str) else t for t in spec]
    return KVStore(tiers, dtype=dtype, expect=expect)
