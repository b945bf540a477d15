"""CacheBlendPrecompute: an ingestion step that computes the KV cache of every node, so the first query is fast."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from cacheblend_rag import CacheBlendEngine, ChunkHandle

from .handles import check_engine, llm_text, record_handle
from .neighbours import neighbour_texts


class CacheBlendPrecompute(TransformComponent):
    """Computes and stores the KV of each node's LLM text and records the handle in its metadata.

    Use it after the node parser (and after any metadata extractor: metadata that the LLM sees is part of
    the text whose KV is computed)::

        index = VectorStoreIndex.from_documents(
            documents, embed_model=embed_model,
            transformations=[SentenceSplitter(chunk_size=256), CacheBlendPrecompute(engine=engine)])

    With ``context=k`` each node's KV is computed after the LLM texts of its k nearest neighbours among the nodes
    of the call, which keeps far more of full recompute's answer quality when the KV is reused than computing each
    node alone (the default, 0). ``neighbours`` says which are nearest: ``"lexical"`` (default; TF-IDF cosine over
    the engine's token ids, as ``engine.precompute`` picks them, anywhere in the pipeline) or ``"embedding"`` (cosine
    of ``node.embedding``: put the embedding model before this step). The recorded handle carries the context, so
    ``CacheBlendNodePostprocessor`` finds the same KV.

    Already stored KV is not computed again. Nodes are returned unchanged apart from the handle in
    ``node.metadata["cacheblend_kv"]`` (excluded from the LLM and embedding views).
    """

    model_name: str = Field(default="", description="The engine's model (informational; set from the engine).")
    model_fingerprint: str = Field(
        default="", description="Identifies model + tokenizer, so an ingestion cache never mixes two models."
    )
    context: int = Field(
        default=0,
        ge=0,
        description="Compute each node's KV after its `context` nearest neighbours among the nodes of the call "
        "(see `neighbours`); 0: each node alone.",
    )
    neighbours: Literal["lexical", "embedding"] = Field(
        default="lexical",
        description="How a node's nearest neighbours are found: 'lexical' (TF-IDF over token ids, as "
        "engine.precompute does) or 'embedding' (node embeddings: put the embedding model first).",
    )
    _engine: CacheBlendEngine = PrivateAttr()
    _last_lexical: tuple | None = PrivateAttr(default=None)  # (texts, k, contexts): ``handles`` then a call reuse it

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

    def contexts(self, nodes: Sequence[BaseNode]) -> tuple[list[BaseNode], list[str], list[list[str]] | None]:
        """The nodes that get KV (those whose LLM text has tokens), their LLM texts, and the texts each is computed
        after (None: alone): its nearest nodes (``neighbours``), trimmed as ``engine.chunk_contexts`` trims them."""
        pairs = [(node, llm_text(node)) for node in _nodes(nodes)]
        pairs = [(node, text) for node, text in pairs if self._engine.tokenize(text)]
        kept, texts = [node for node, _ in pairs], [text for _, text in pairs]
        if not self.context:
            return kept, texts, None
        if self.neighbours == "lexical":  # O(N^2) over the nodes: computed once for a plan and the ingest after it
            last = self._last_lexical
            if last is None or last[0] != texts or last[1] != self.context:
                last = self._last_lexical = (texts, self.context, self._engine.nearest_contexts(texts, self.context))
            return kept, texts, [list(c) for c in last[2]]
        return kept, texts, self._engine.chunk_contexts(texts, neighbour_texts(kept, texts, self.context))

    def handles(self, nodes: Sequence[BaseNode]) -> list[tuple[BaseNode, ChunkHandle]]:
        """(node, the handle its KV will be stored under) for the nodes that get KV; computes nothing."""
        kept, texts, contexts = self.contexts(nodes)
        contexts = contexts or [[] for _ in texts]
        return [
            (node, self._engine.handle(text, context_ids=self._engine.context_ids(context)))
            for node, text, context in zip(kept, texts, contexts)
        ]

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        kept, texts, contexts = self.contexts(nodes)
        progress = bool(kwargs.get("show_progress", False))
        handles = self._engine.precompute(texts, progress=progress, context=contexts)
        for node, handle in zip(kept, handles):
            record_handle(node, handle)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)


def _nodes(nodes: Sequence[BaseNode]) -> list[BaseNode]:
    for i, node in enumerate(nodes):
        if not isinstance(node, BaseNode):
            raise TypeError(f"nodes[{i}] is a {type(node).__name__}; expected a LlamaIndex node (BaseNode)")
    return list(nodes)
