"""The RAG app: a LlamaIndex pipeline over the engine (ingest documents, ask questions), and its sample corpus.

Needs the LlamaIndex integration (``pip install -e integrations/llama-index-cacheblend``); it is imported
only when an index is built, loaded or asked.
"""

from .answer import Answer
from .documents import DocumentError, SourceDocument, read_documents, sample_corpus
from .index import DEFAULT_TOP_K, IngestPlan, KVBudgetError, RagIndex, RagIndexError

__all__ = [
    "DEFAULT_TOP_K",
    "Answer",
    "DocumentError",
    "IngestPlan",
    "KVBudgetError",
    "RagIndex",
    "RagIndexError",
    "SourceDocument",
    "read_documents",
    "sample_corpus",
]
