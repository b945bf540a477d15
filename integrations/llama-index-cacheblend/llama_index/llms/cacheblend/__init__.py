"""LlamaIndex LLM over cacheblend-rag: prompts reuse the stored KV cache of their retrieved chunks."""

from llama_index.llms.cacheblend.base import CacheBlendLLM

__all__ = ["CacheBlendLLM"]
