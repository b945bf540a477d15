"""The context a node's KV is computed after: its nearest neighbours among the nodes ingested with it.

A chunk's KV computed after other passages of its corpus (``engine.precompute(context=...)``) keeps far more of
full recompute's answer quality under reuse than a chunk computed alone; random neighbours did about as well as
similar ones, but the nearest ones are the passages a query most likely retrieves with it. Neighbours come from
the node embeddings (cosine), least similar first, so the nearest passage sits right before the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from llama_index.core.schema import BaseNode

ROWS = 1024  # similarity rows per block: [ROWS, N] floats at a time, never [N, N]


def nearest(embeddings: np.ndarray, k: int) -> list[list[int]]:
    """For each row of ``embeddings`` ([N, E]), the indices of its ``k`` most similar other rows (cosine), least
    similar first; fewer when there are fewer other rows."""
    n = embeddings.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return [[] for _ in range(n)]
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)  # [N, E]
    out = []
    for start in range(0, n, ROWS):
        sims = unit[start : start + ROWS] @ unit.T  # [B, N]
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # never its own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [B, k] unordered
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1, kind="stable")  # least similar first
        out.extend(np.take_along_axis(top, order, axis=1).tolist())
    return out


def neighbour_texts(nodes: Sequence[BaseNode], texts: Sequence[str], k: int) -> list[list[str]]:
    """The texts of each node's ``k`` nearest neighbours among ``nodes`` (by ``node.embedding``)."""
    missing = [i for i, node in enumerate(nodes) if node.embedding is None]
    if missing:
        raise ValueError(
            f"context={k} needs node embeddings, and nodes[{missing[0]}] has none: put the embedding model before "
            "CacheBlendPrecompute in the transformations (or use context=0: each node computed alone)"
        )
    if not nodes:
        return []
    embeddings = np.asarray([node.embedding for node in nodes], dtype=np.float32)  # [N, E]
    return [[texts[j] for j in row] for row in nearest(embeddings, k)]
