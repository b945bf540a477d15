"""CacheBlendNodePostprocessor and the CacheBlendPrecompute ingestion step on the real SmolLM2 engine."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core import Document
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from llama_index.postprocessor.cacheblend import (
    HANDLE_METADATA_KEY,
    CacheBlendNodePostprocessor,
    CacheBlendPrecompute,
    node_handle_key,
)
from torch.testing import assert_close

pytestmark = pytest.mark.real_model


def views(node) -> tuple[str, str]:
    return node.get_content(metadata_mode=MetadataMode.LLM), node.get_content(metadata_mode=MetadataMode.EMBED)


def test_empty_list_gives_empty_list(postprocessor, reuse):
    assert postprocessor.postprocess_nodes([]) == []
    assert asyncio.run(postprocessor.apostprocess_nodes([])) == []
    assert reuse()["precomputed_chunks"] == 0


def test_nodes_keep_order_scores_and_views(postprocessor, engine, reuse):
    lake = TextNode(text="Orchid Lake is 41 metres deep at its centre.", metadata={"src": "a.txt"})
    ferry = TextNode(text="The Sela ferry crosses the strait in 35 minutes.")
    empty = TextNode(text="")
    station = TextNode(text="Bellmoor station has 12 platforms.", metadata={"hidden": "x" * 30})
    station.excluded_llm_metadata_keys = ["hidden"]
    scored = [(lake, 0.9), (ferry, None), (empty, 0.4), (station, 0.1)]
    nodes = [NodeWithScore(node=node, score=score) for node, score in scored]
    before = [(item.node.node_id, item.score, *views(item.node)) for item in nodes]

    out = postprocessor.postprocess_nodes(nodes)

    assert [(item.node.node_id, item.score, *views(item.node)) for item in out] == before
    assert all(a is b for a, b in zip(out, nodes))
    assert "src: a.txt" in views(out[0].node)[0]  # the cached text is the LLM view, metadata included
    assert HANDLE_METADATA_KEY not in out[2].node.metadata  # an empty text has nothing to cache
    texts = [item.node.get_content(metadata_mode=MetadataMode.LLM) for item in (out[0], out[1], out[3])]
    for i, item in enumerate((out[0], out[1], out[3])):
        text = texts[i]
        # a node with no KV yet is computed after the 2 nodes (with text) retrieved before it, cyclic
        context = [texts[(i - 2) % 3], texts[(i - 1) % 3]]
        handle = engine.handle(text, context_ids=[t for c in context for t in engine.tokenize(c)])
        assert item.node.metadata[HANDLE_METADATA_KEY] == handle.to_dict() and node_handle_key(item.node) == handle.key
        assert HANDLE_METADATA_KEY in item.node.excluded_llm_metadata_keys
        assert HANDLE_METADATA_KEY in item.node.excluded_embed_metadata_keys
        assert engine.store.contains(handle.key) and engine.registry.lookup(text) == handle
    assert reuse()["precomputed_chunks"] == 3

    prompt = engine.format_chat([{"role": "user", "content": "\n\n".join(texts) + "\nHow deep is Orchid Lake?"}])
    result = engine.generate(prompt=prompt, max_new_tokens=4)
    assert result.stats.cache_hits == 3 and result.stats.cache_misses == 0 and result.stats.reused_tokens > 0


def test_corrupt_kv_file_is_recomputed(postprocessor, engine):
    node = TextNode(text="The Quillon observatory telescope has a mirror 3.6 metres wide.")
    postprocessor.postprocess_nodes([NodeWithScore(node=node, score=1.0)])
    key = node_handle_key(node)
    memory, disk = engine.store.tiers
    path = disk.path(key)
    assert path.is_file()
    good = disk.get(key)
    memory.delete(key)  # the next read goes to the disk tier
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated file
    corrupt = disk.stats.corrupt

    out = postprocessor.postprocess_nodes([NodeWithScore(node=node, score=1.0)])

    assert out[0].node is node and node_handle_key(node) == key
    assert disk.stats.corrupt == corrupt + 1
    fresh = disk.get(key)  # rewritten, and it reads back as the KV it held before
    assert fresh is not None
    assert_close(fresh.k, good.k)
    assert_close(fresh.v, good.v)
    prompt = engine.format_chat([{"role": "user", "content": node.text + "\nHow wide is the mirror?"}])
    stats = engine.generate(prompt=prompt, max_new_tokens=2).stats
    assert stats.cache_hits == 1 and stats.cache_misses == 0


def test_ingestion_precomputes_each_node_once(engine, reuse):
    text = (
        "The Arden canal is 58 kilometres long. It has 23 locks and was finished in 1794. "
        "Barges carried coal along it until 1962, when the last mine closed."
    )
    transform = CacheBlendPrecompute(engine=engine)
    splitter = SentenceSplitter(chunk_size=24, chunk_overlap=0, tokenizer=engine.tokenize)
    pipeline = IngestionPipeline(transformations=[splitter, transform])
    nodes = pipeline.run(documents=[Document(text=text, metadata={"file_name": "arden.txt"})])

    assert len(nodes) > 1
    assert reuse()["precomputed_chunks"] == len(nodes)
    for node in nodes:
        llm_view, embed_view = views(node)
        assert node_handle_key(node) == engine.handle(llm_view).key and engine.store.contains(node_handle_key(node))
        assert node_handle_key(node) not in embed_view and HANDLE_METADATA_KEY not in llm_view

    again = asyncio.run(transform.acall(nodes))  # already stored: nothing is computed again
    assert list(again) == list(nodes)
    counts = reuse()
    assert counts["precomputed_chunks"] == len(nodes) and counts["precompute_cache_hits"] == len(nodes)
    assert transform.to_dict()["model_fingerprint"] == engine.fingerprint  # serialisable, for ingestion caches


def test_bad_input_is_named(postprocessor):
    with pytest.raises(TypeError, match="engine must be a CacheBlendEngine"):
        CacheBlendNodePostprocessor(engine="smollm2-135m")
    with pytest.raises(TypeError, match="engine must be a CacheBlendEngine"):
        CacheBlendPrecompute(engine=None)
    with pytest.raises(TypeError, match="NodeWithScore"):
        postprocessor.postprocess_nodes([TextNode(text="a node without a score wrapper")])
