"""LangChain integration of cacheblend-rag: reuse precomputed chunk KV caches in RAG prompts."""

import logging

from .chat_models import ChatCacheBlend
from .llms import CacheBlendLLM
from .retrievers import CacheBlendRetriever

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = ["CacheBlendLLM", "CacheBlendRetriever", "ChatCacheBlend", "__version__"]
