"""CacheBlendNodePostprocessor: make sure every retrieved node's KV is stored, and let the LLM find it."""

from __future__ import annotations

import logging

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from cacheblend_rag import CacheBlendEngine

from .handles import check_engine, node_handles, record_handle

logger = logging.getLogger(__name__)


class CacheBlendNodePostprocessor(BaseNodePostprocessor):
    """Ensures the KV cache of each retrieved node is stored and registered with the engine.

    For every node it takes exactly the text the LLM will see (``node.get_content(MetadataMode.LLM)``),
    loads its KV from the store or computes what is missing (a corrupt or lost cache file is recomputed),
    registers the text so that ``CacheBlendLLM`` reuses the KV wherever the text appears in a prompt, and
    records the handle in ``node.metadata["cacheblend_kv"]`` (excluded from the LLM and embedding views).
    A node with no KV yet (not ingested with ``CacheBlendPrecompute``, its text never registered) is computed
    after the ``context`` nodes retrieved before it (default 2), as ``CacheBlendPrecompute(context=k)`` computes
    a node after its neighbours: a chunk's KV computed among other passages keeps far more of full recompute's
    quality under reuse than one computed alone.

    Nodes keep their order and scores; none is dropped or rewritten. A node with an empty text gets no
    handle. Put it last in ``node_postprocessors`` so it sees the texts the synthesizer will format::

        query_engine = index.as_query_engine(llm=CacheBlendLLM(engine=engine),
                                             node_postprocessors=[CacheBlendNodePostprocessor(engine=engine)])
    """

    model_name: str = Field(default="", description="The engine's model (informational; set from the engine).")
    context: int = Field(
        default=2,
        ge=0,
        description="Compute a node that has no stored KV yet (none recorded at ingestion, its text not registered) "
        "after the LLM texts of the `context` nodes retrieved before it (cyclic); 0: alone. Chunks computed among "
        "the passages they are retrieved with keep far more of full recompute's quality under reuse.",
    )
    _engine: CacheBlendEngine = PrivateAttr()

    def __init__(self, engine: CacheBlendEngine, **kwargs) -> None:
        engine = check_engine(engine)
        super().__init__(model_name=engine.name, **kwargs)
        self._engine = engine

    @property
    def engine(self) -> CacheBlendEngine:
        return self._engine

    @classmethod
    def class_name(cls) -> str:
        return "CacheBlendNodePostprocessor"

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        for i, item in enumerate(nodes):
            if not isinstance(item, NodeWithScore):
                raise TypeError(f"nodes[{i}] is a {type(item).__name__}; postprocessors take NodeWithScore items")
        engine = self._engine
        before = engine.metrics()["precomputed_chunks"]
        pairs = node_handles(engine, [item.node for item in nodes], self.context)  # stored and registered
        computed = engine.metrics()["precomputed_chunks"] - before
        for node, handle in pairs:
            # chunk_kv reads (and validates) the stored KV, recomputing a corrupt one; the blend needs it next
            _, hit = engine.chunk_kv(handle)
            computed += not hit
            record_handle(node, handle)
        logger.debug("postprocessed %d nodes: %d with KV, %d computed now", len(nodes), len(pairs), computed)
        return list(nodes)
