"""Chunk KV storage: content-addressed keys, tiers (memory, disk) and the store that chains them."""

from .chunk import ChunkHandle, ChunkKV
from .disk import DiskTier
from .keys import chain_key, model_fingerprint
from .kvstore import KVStore
from .memory import MemoryTier
from .urls import parse_bytes, tier_from_url

__all__ = ["ChunkHandle", "ChunkKV", "DiskTier", "KVStore", "MemoryTier", "chain_key", "model_fingerprint",
           "parse_bytes", "tier_from_url"]  # fmt: skip
