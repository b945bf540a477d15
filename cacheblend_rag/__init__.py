"""cacheblend-rag: fast RAG prefill by blending precomputed chunk KV caches (CacheBlend, EuroSys 2025)."""

import logging

from .config import BlendConfig
from .engine import CacheBlendEngine, GenerationResult, GenerationStream, RequestStats, SamplingParams
from .model import ModelNotFoundError, UnsupportedModelError
from .store import ChunkHandle, ChunkKV, KVStore

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "BlendConfig",
    "CacheBlendEngine",
    "ChunkHandle",
    "ChunkKV",
    "GenerationResult",
    "GenerationStream",
    "KVStore",
    "ModelNotFoundError",
    "RequestStats",
    "SamplingParams",
    "UnsupportedModelError",
    "__version__",
]
