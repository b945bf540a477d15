"""The RAG app: documents indexed with LlamaIndex (MiniLM embeddings, faiss), every chunk's KV precomputed, and
questions answered through the LlamaIndex integration (``CacheBlendLLM``, ``CacheBlendNodePostprocessor``).

It is the layer above the integrations: ``cacheblend ingest``, ``cacheblend ask`` and the RAG part of
``cacheblend demo`` import it when they run; the core package never does.
"""

from .answer import Answer
from .documents import DocumentError, SourceDocument, read_documents, sample_corpus
from .index import (
    DEFAULT_TOP_K,
    INSTALL,
    IngestPlan,
    KVBudgetError,
    RagIndex,
    RagIndexError,
    check_replaceable,
    human_bytes,
    read_manifest,
    require_llama_index,
)

__all__ = [
    "DEFAULT_TOP_K",
    "INSTALL",
    "Answer",
    "DocumentError",
    "IngestPlan",
    "KVBudgetError",
    "RagIndex",
    "RagIndexError",
    "SourceDocument",
    "check_replaceable",
    "human_bytes",
    "read_documents",
    "read_manifest",
    "require_llama_index",
    "sample_corpus",
]
