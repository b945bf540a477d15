"""cacheblend-rag: fast RAG prefill by blending precomputed chunk KV caches (CacheBlend, EuroSys 2025).

The public names load on first use (``from cacheblend_rag import CacheBlendEngine`` as usual): importing the
package alone loads no torch, so the ``cacheblend`` command can set torch's OpenMP settings before torch loads
(cli/__init__.py).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import BlendConfig
    from .engine import CacheBlendEngine, GenerationResult, GenerationStream, RequestStats, SamplingParams
    from .model import ModelNotFoundError, UnsupportedModelError
    from .store import ChunkHandle, ChunkKV, KVStore

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

_HOMES = {  # public name -> the subpackage that defines it
    "BlendConfig": "config",
    "CacheBlendEngine": "engine",
    "GenerationResult": "engine",
    "GenerationStream": "engine",
    "RequestStats": "engine",
    "SamplingParams": "engine",
    "ModelNotFoundError": "model",
    "UnsupportedModelError": "model",
    "ChunkHandle": "store",
    "ChunkKV": "store",
    "KVStore": "store",
}

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


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
