"""CacheBlendPrecompute: an ingestion step that computes the KV cache of every node, so the first query is fast."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from cacheblend_rag import CacheBlendEngine

from .handles import check_engine, node_handles, record_handle


class CacheBlendPrecompute(TransformComponent):
    """Computes and stores the KV of each node's LLM text and records the handle in its metadata.

    Use it after the node parser (and after any metadata extractor: metadata that the LLM sees is part of
    the text whose KV is computed)::

        index = VectorStoreIndex.from_documents(
            documents, embed_model=embed_model,
            transformations=[SentenceSplitter(chunk_size=256), CacheBlendPrecompute(engine=engine)])

    Already stored KV is not computed again. Nodes are returned unchanged apart from the handle in
    ``node.metadata["cacheblend_kv"]`` (excluded from the LLM and embedding views).
    """

    model_name: str = Field(default="", description="The engine's model (informational; set from the engine).")
    model_fingerprint: str = Field(
        default="", description="Identifies model + tokenizer, so an ingestion cache never mixes two models."
    )
    _engine: CacheBlendEngine = PrivateAttr()

    def __init__(self, engine: CacheBlendEngine, **kwargs: Any) -> None:
        engine = check_engine(engine)
        super().__init__(model_name=engine.name, model_fingerprint=engine.fingerprint, **kwargs)
        self._engine = engine

    @property
    def engine(self) -> CacheBlendEngine:
        return self._engine

    @classmethod
    def class_name(cls) -> str:
        return "CacheBlendPrecompute"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        pairs = node_handles(self._engine, nodes)
        texts = [handle.text for _, handle in pairs]
        handles = self._engine.precompute(texts, progress=bool(kwargs.get("show_progress", False)))
        for (node, _), handle in zip(pairs, handles):
            record_handle(node, handle)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
