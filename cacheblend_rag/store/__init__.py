"""Chunk KV storage: content-addressed keys, tiers (memory, disk, Redis) and the store that chains them."""

from .chunk import ChunkHandle, ChunkKV
from .codec import PackedKV
from .disk import DiskTier
from .entry import CorruptEntry, TierUnavailable
from .keys import chain_key, model_fingerprint
from .kvstore import KVStore
from .memory import MemoryTier
from .pipeline import ChunkReadError, LazyChunk
from .redis_tier import RedisTier
from .urls import parse_bytes, tier_from_url

__all__ = [
    "ChunkHandle",
    "ChunkKV",
    "ChunkReadError",
    "CorruptEntry",
    "DiskTier",
    "KVStore",
    "LazyChunk",
    "MemoryTier",
    "PackedKV",
    "RedisTier",
    "TierUnavailable",
    "chain_key",
    "model_fingerprint",
    "parse_bytes",
    "tier_from_url",
]
