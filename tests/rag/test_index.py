"""RagIndex on a tiny random model (fast) with the real MiniLM embeddings and faiss: build, ask, persist, load."""

from __future__ import annotations

import json

import pytest
from cacheblend_rag_app import RagIndex, RagIndexError, read_documents
from cacheblend_rag_app.index import MANIFEST

QUESTION = "How tall is the Brannock Light?"


@pytest.fixture
def engine(make_engine):
    return make_engine("llama", seed=1)


@pytest.fixture
def index(engine, docs_dir):
    return RagIndex.build(engine, read_documents(docs_dir), chunk_size=128, chunk_overlap=0)


def test_build_precomputes_every_chunk(engine, index):
    assert index.n_nodes == 3 and engine.metrics()["precomputed_chunks"] == 3
    assert index.manifest["documents"] == ["bakery.md", "lighthouse.md", "notes/ferry.txt"]


def test_ask_reuses_the_retrieved_chunks(engine, index):
    from llama_index.core.instrumentation import get_dispatcher

    handlers = len(get_dispatcher().event_handlers)
    pieces = []
    answer = index.ask(QUESTION, top_k=2, max_new_tokens=6, on_text=pieces.append)

    assert answer.text == "".join(pieces).strip()
    assert answer.llm_calls == 1 and answer.ttft_s > 0
    assert answer.cache_hits == 2 and answer.cache_misses == 0
    assert 0 < answer.reused_tokens < answer.prompt_tokens
    assert answer.reused_tokens + answer.recomputed_tokens == answer.prompt_tokens
    assert answer.sources[0]["name"] == "lighthouse.md" and len(answer.sources) == 2
    assert answer.sources[0]["score"] >= answer.sources[1]["score"]
    assert engine.metrics()["precomputed_chunks"] == 3  # nothing computed at query time
    assert len(get_dispatcher().event_handlers) == handlers  # the recorder removed itself

    full = index.ask(QUESTION, strategy="full_recompute", top_k=2, max_new_tokens=6)
    assert full.reused_tokens == 0 and full.recomputed_tokens == full.prompt_tokens == answer.prompt_tokens
    assert full.recompute_ratio is None and answer.recompute_ratio == 0.15
    assert set(answer.as_dict()) >= {"question", "text", "ttft_s", "reused_tokens", "sources", "reuse_fraction"}


def test_persist_and_load_answer_the_same(engine, index, tmp_path):
    before = index.ask(QUESTION, top_k=2, max_new_tokens=6)
    folder = index.persist(tmp_path / "index")
    assert json.loads((folder / MANIFEST).read_text())["nodes"] == 3

    loaded = RagIndex.load(engine, folder)
    after = loaded.ask(QUESTION, top_k=2, max_new_tokens=6)
    assert loaded.n_nodes == 3 and after.text == before.text
    assert [s["name"] for s in after.sources] == [s["name"] for s in before.sources]
    assert after.cache_hits == 2 and after.cache_misses == 0


def test_persist_replaces_an_index_but_never_other_files(engine, docs_dir, index, tmp_path):
    folder = index.persist(tmp_path / "index")
    smaller = RagIndex.build(engine, read_documents(docs_dir / "bakery.md"))
    smaller.persist(folder)
    assert RagIndex.load(engine, folder).manifest["documents"] == ["bakery.md"]
    assert not (tmp_path / "index.new").exists() and not (tmp_path / "index.old").exists()

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"jpg")
    with pytest.raises(RagIndexError, match="is not a cacheblend index"):
        index.persist(other)
    assert [p.name for p in other.iterdir()] == ["cat.jpg"]


def test_load_without_an_index_names_the_ingest_command(engine, tmp_path):
    with pytest.raises(RagIndexError, match="run `cacheblend ingest PATH` first"):
        RagIndex.load(engine, tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{")
    with pytest.raises(RagIndexError, match="unreadable"):
        RagIndex.load(engine, tmp_path / "bad")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"question": "  "}, "question must be a non-empty string"),
        ({"strategy": "magic"}, "strategy must be one of"),
        ({"top_k": 0}, "top_k must be an int >= 1"),
    ],
)
def test_ask_rejects_bad_arguments(index, kwargs, message):
    kwargs = {"question": QUESTION, **kwargs}
    with pytest.raises(ValueError, match=message):
        index.ask(kwargs.pop("question"), **kwargs)


def test_chunks_are_computed_after_their_nearest_chunks_and_reused_by_another_process(make_engine, docs_dir, tmp_path):
    """The ingest computes each node after its 2 nearest nodes (the default context); an engine that never saw the
    ingest (a later `cacheblend ask`) finds that KV through the handle recorded in the node, computing nothing."""
    from llama_index.core.schema import MetadataMode

    writer = make_engine("llama", seed=1, disk=True)
    index = RagIndex.build(writer, read_documents(docs_dir), chunk_size=128, chunk_overlap=0)
    assert index.manifest["context"] == 2 and index.manifest["neighbours"] == "lexical"
    nodes = list(index.index.docstore.docs.values())
    texts = {n.node_id: n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes}
    for node in nodes:
        recorded = node.metadata["cacheblend_kv"]
        others = [t for i, t in texts.items() if i != node.node_id]
        context = recorded["context_ids"]
        assert sorted(context) == sorted(t for text in others for t in writer.tokenize(text))  # 3 nodes: the 2 others
        assert recorded["key"] == writer.handle(texts[node.node_id], context_ids=context).key
    folder = index.persist(tmp_path / "index")

    reader = make_engine("llama", seed=1, disk=True)  # the same disk store, an empty registry
    answer = RagIndex.load(reader, folder).ask(QUESTION, top_k=2, max_new_tokens=4)
    assert answer.cache_hits == 2 and answer.cache_misses == 0 and answer.reused_tokens > 0
    metrics = reader.metrics()
    assert metrics["computed_on_miss"] == 0 and metrics["precomputed_chunks"] == 0


def test_context_zero_computes_each_chunk_alone(engine, docs_dir):
    index = RagIndex.build(engine, read_documents(docs_dir), chunk_size=128, chunk_overlap=0, context=0)
    assert all("context_ids" not in n.metadata["cacheblend_kv"] for n in index.index.docstore.docs.values())
    with pytest.raises(ValueError, match="context must be an int >= 0"):
        RagIndex.build(engine, read_documents(docs_dir), context=-1)
    with pytest.raises(ValueError, match="neighbours must be 'lexical' or 'embedding'"):
        RagIndex.build(engine, read_documents(docs_dir), neighbours="bm25")
