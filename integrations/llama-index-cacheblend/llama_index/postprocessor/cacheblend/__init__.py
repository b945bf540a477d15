"""LlamaIndex retrieval-side pieces of cacheblend-rag: the node postprocessor and the ingestion step."""

from llama_index.postprocessor.cacheblend.base import CacheBlendNodePostprocessor
from llama_index.postprocessor.cacheblend.handles import HANDLE_METADATA_KEY, node_handle_key
from llama_index.postprocessor.cacheblend.ingestion import CacheBlendPrecompute
from llama_index.postprocessor.cacheblend.offline import MINILM_DIM, faiss_vector_store, minilm_embedding

__all__ = [
    "HANDLE_METADATA_KEY",
    "MINILM_DIM",
    "CacheBlendNodePostprocessor",
    "CacheBlendPrecompute",
    "faiss_vector_store",
    "minilm_embedding",
    "node_handle_key",
]
