"""The context a node's KV is computed after, with ``CacheBlendPrecompute(neighbours="embedding")``: its nearest
neighbours among the nodes ingested with it, by node embedding (the default, lexical neighbours, are the engine's).

The neighbours come from the node embeddings (cosine), least similar first, so the nearest passage sits right
before the chunk: ``nearest`` of the core (``cacheblend_rag.neighbours``, where the reasons are), over the
embeddings LlamaIndex's embedding model put on the nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from llama_index.core.schema import BaseNode

from cacheblend_rag.neighbours import nearest


def neighbour_texts(nodes: Sequence[BaseNode], texts: Sequence[str], k: int) -> list[list[str]]:
    """The texts of each node's ``k`` nearest neighbours among ``nodes`` (by ``node.embedding``)."""
    missing = [i for i, node in enumerate(nodes) if node.embedding is None]
    if missing:
        raise ValueError(
            f"context={k} with neighbours='embedding' needs node embeddings, and nodes[{missing[0]}] has none: put "
            "the embedding model before CacheBlendPrecompute in the transformations (or use neighbours='lexical', "
            "or context=0: each node computed alone)"
        )
    if not nodes:
        return []
    embeddings = np.asarray([node.embedding for node in nodes], dtype=np.float32)  # [N, E]
    return [[texts[j] for j in row] for row in nearest(embeddings, k)]
