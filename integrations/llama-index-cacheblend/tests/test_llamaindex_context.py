"""Nodes precomputed after their nearest neighbours (CacheBlendPrecompute(context=k)): the recorded handle names the
context, and a retrieved node (read back from a docstore, by an engine whose registry never saw it) reuses that KV."""

from __future__ import annotations

import pytest
from llama_index.core import Document
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from llama_index.postprocessor.cacheblend import CacheBlendNodePostprocessor, CacheBlendPrecompute, node_handle_key

pytestmark = pytest.mark.real_model

TEXTS = [
    "The Marlow glassworks opened in 1874 and made bottles for the breweries of the valley.",
    "By 1900 the Marlow glassworks employed 300 people and ran four furnaces day and night.",
    "The Fenwick orchard grows eleven kinds of apple on a south-facing slope above the river.",
    "Fenwick apples are pressed each October into a cider sold at the village market.",
]


@pytest.mark.parametrize("neighbours", ["lexical", "embedding"])
def test_a_retrieved_node_reuses_its_context_kv(engine, settings, embed_model, reuse, neighbours):
    transform = CacheBlendPrecompute(engine=engine, context=1, neighbours=neighbours)
    splitter = SentenceSplitter(chunk_size=64, chunk_overlap=0, tokenizer=engine.tokenize)
    pipeline = IngestionPipeline(transformations=[splitter, embed_model, transform])
    nodes = pipeline.run(documents=[Document(text=t) for t in TEXTS])
    counts = reuse()
    assert len(nodes) == 4 and counts["precomputed_chunks"] + counts["precompute_cache_hits"] == 4  # stored, once
    texts = [n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
    neighbour = {0: 1, 1: 0, 2: 3, 3: 2}  # same topic and names: the nearest node, either way
    planned = transform.handles(nodes)
    for i, node in enumerate(nodes):
        handle = engine.handle(texts[i], context_ids=engine.tokenize(texts[neighbour[i]]))
        assert node_handle_key(node) == handle.key != engine.handle(texts[i]).key and planned[i][1] == handle
        assert engine.store.contains(handle.key)

    # what a query process sees: nodes read back from the docstore, a registry that never saw them
    registry, engine.registry = engine.registry, engine.new_registry()
    retrieved = [NodeWithScore(node=TextNode.from_json(n.to_json()), score=0.5) for n in nodes[:2]]
    before = reuse()
    try:
        CacheBlendNodePostprocessor(engine=engine).postprocess_nodes(retrieved)
    finally:
        fresh, engine.registry = engine.registry, registry
    after = reuse()
    assert all(fresh.lookup(t) is not None and fresh.lookup(t).context_ids for t in texts[:2])
    assert after["computed_on_miss"] == before["computed_on_miss"]  # the context KV was found, not recomputed
    assert [node_handle_key(item.node) for item in retrieved] == [node_handle_key(n) for n in nodes[:2]]
    prompt = engine.format_chat([{"role": "user", "content": "\n\n".join(texts[:2]) + "\nWhen did it open?"}])
    for handle in [fresh.lookup(t) for t in texts[:2]]:
        engine.register([handle])
    stats = engine.generate(prompt=prompt, max_new_tokens=2).stats
    assert stats.cache_hits == 2 and stats.cache_misses == 0 and stats.cached_tokens > 0
    assert reuse()["computed_on_miss"] == before["computed_on_miss"]


def test_embedding_neighbours_need_embeddings_lexical_ones_do_not(engine):
    nodes = [TextNode(text=t) for t in TEXTS]
    with pytest.raises(ValueError, match="put the embedding model before CacheBlendPrecompute"):
        CacheBlendPrecompute(engine=engine, context=2, neighbours="embedding")(nodes[:2])
    transform = CacheBlendPrecompute(engine=engine, context=2)  # lexical by default
    assert transform.neighbours == "lexical"
    planned = transform.handles(nodes)
    texts = [n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
    want = engine.nearest_contexts(texts, 2)
    assert [list(h.context_ids) for _, h in planned] == [list(engine.context_ids(c)) for c in want]
    calls = []
    real = engine.nearest_contexts
    engine.nearest_contexts = lambda *a: calls.append(a) or real(*a)
    try:
        transform(nodes)  # the ingest after its plan: the neighbours are not looked for again
        assert calls == [] and [node_handle_key(n) for n in nodes] == [h.key for _, h in planned]
        CacheBlendPrecompute(engine=engine, context=1).handles(nodes)  # another k: looked for
        assert len(calls) == 1
    finally:
        del engine.nearest_contexts
    with pytest.raises(ValueError):
        CacheBlendPrecompute(engine=engine, context=2, neighbours="bm25")


def test_a_long_neighbour_is_trimmed_before_a_short_node(engine):
    """A node's neighbours are trimmed as engine.chunk_contexts trims them (at most context * max(node tokens, 512)
    tokens, the nearest kept, the first that would overflow cut to its end): a short node beside a long document
    costs a bounded prefill, and the recorded handle names the trimmed context."""
    long = " ".join(f"Ledger line {i} records a payment of {i * 3} crowns." for i in range(150))
    nodes = [
        TextNode(text=TEXTS[0], embedding=[1.0, 0.0]),
        TextNode(text=long, embedding=[0.9, 0.1]),  # the short node's nearest neighbour
        TextNode(text=TEXTS[2], embedding=[0.0, 1.0]),
    ]
    transform = CacheBlendPrecompute(engine=engine, context=1, neighbours="embedding")
    planned = dict((id(node), handle) for node, handle in transform.handles(nodes))
    transform(nodes)
    texts = [n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
    assert len(engine.tokenize(texts[1])) > 512
    (context,) = engine.chunk_contexts([texts[0]], [[texts[1]]])
    assert texts[1].endswith(context[0]) and 512 - 16 <= len(engine.tokenize(context[0])) <= 512
    short = planned[id(nodes[0])]
    assert list(short.context_ids) == engine.tokenize(context[0]) and node_handle_key(nodes[0]) == short.key
    assert engine.store.contains(short.key)
    # the long node keeps its short neighbour whole
    assert list(planned[id(nodes[1])].context_ids) == engine.tokenize(texts[0])
