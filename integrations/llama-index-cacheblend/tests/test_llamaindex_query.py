"""Query engines over a real faiss VectorStoreIndex (MiniLM embeddings) answered by CacheBlendLLM (SmolLM2-135M)."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.schema import MetadataMode
from llama_index.llms.cacheblend import CacheBlendLLM
from llama_index.postprocessor.cacheblend import HANDLE_METADATA_KEY

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

LIGHTHOUSE = "How tall is the Lighthouse of Varna?"  # the documents say 27 metres
LIBRARY = "How many books does the Oakton library hold?"  # 340,000
BRIDGE = "How long is the Penwick Harbour Bridge?"  # 1,240 metres; the longest document, split by small windows


def llm_texts(index) -> list[str]:
    """The LLM view of every node in the index: the texts whose KV is cached."""
    return [node.get_content(metadata_mode=MetadataMode.LLM) for node in index.docstore.docs.values()]


def contains_run(run, ids) -> bool:
    run, ids = list(run), list(ids)
    return any(ids[i : i + len(run)] == run for i in range(len(ids) - len(run) + 1))


def check_accounting(engine, index, calls) -> list[dict]:
    """Each LLM call reused exactly the cached node texts that appear whole in its prompt, tokenized as alone (a
    text merged into a token with the character before or after it is computed); the rest was computed."""
    texts = llm_texts(index)
    stats = []
    for prompt, response in calls:
        s = response.additional_kwargs
        ids = engine.tokenize(prompt)
        whole = [t for t in texts if t in prompt and contains_run(engine.handle(t).token_ids, ids)]
        assert s["cache_hits"] == len(whole) and s["cache_misses"] == 0, (prompt, s)
        assert s["cached_tokens"] == sum(engine.handle(t).n_tokens for t in whole), (prompt, s)
        assert s["prompt_tokens"] - s["cached_tokens"] <= s["recomputed_tokens"] < s["prompt_tokens"] or not whole
        stats.append({**s, "whole": whole})
    return stats


def test_query_reuses_retrieved_chunks(index, llm, postprocessor, engine, llm_calls, reuse):
    query_engine = index.as_query_engine(llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2)
    response = query_engine.query(LIBRARY)

    assert "340" in str(response)
    counts = reuse()
    # the ingestion step stored every node's KV, so the query computes none and reuses the retrieved chunks
    assert counts["requests"] == 1 and counts["precomputed_chunks"] == 0
    assert counts["reused_tokens"] > 0 and counts["cache_hits"] == 2 and counts["cache_misses"] == 0

    [(prompt, completion)] = llm_calls
    assert completion.additional_kwargs["reused_tokens"] == counts["reused_tokens"]
    assert HANDLE_METADATA_KEY not in prompt
    for item in response.source_nodes:
        handle = item.node.metadata[HANDLE_METADATA_KEY]
        assert handle["key"] not in prompt and handle["model_fingerprint"] not in prompt
        assert item.node.get_content(metadata_mode=MetadataMode.LLM) in prompt
    assert "topic: library\n\nThe city library" in prompt  # metadata the LLM sees is part of the cached text


@pytest.mark.parametrize("mode", ["compact", "refine", "simple_summarize", "tree_summarize", "accumulate"])
def test_response_modes_answer_and_reuse_whole_chunks(mode, index, llm, postprocessor, engine, llm_calls):
    query_engine = index.as_query_engine(
        llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2, response_mode=mode
    )
    response = query_engine.query(LIGHTHOUSE)

    assert "27" in str(response)
    stats = check_accounting(engine, index, llm_calls)
    # the context window is large: no mode splits a node, so every retrieved node is reused in some call, except
    # in simple_summarize, which quotes the texts as a Python list: "." + "'," is one token (see the README)
    sources = [item.node.get_content(metadata_mode=MetadataMode.LLM) for item in response.source_nodes]
    if mode != "simple_summarize":
        assert all(any(text in s["whole"] for s in stats) for text in sources)
    assert all(s["reused_tokens"] > 0 for s in stats if s["whole"])


def test_chat_model_query_reuses_chunks(index, engine, postprocessor, llm_calls):
    # is_chat_model=True: LlamaIndex sends its chat prompts (system + user message) through llm.chat
    llm = CacheBlendLLM(engine=engine, max_new_tokens=24, is_chat_model=True)
    query_engine = index.as_query_engine(llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2)
    response = query_engine.query(LIGHTHOUSE)

    assert "27" in str(response)
    [(messages, chat)] = llm_calls
    assert [m.role.value for m in messages] == ["system", "user"]
    prompt = llm.messages_to_prompt(messages)
    [stats] = check_accounting(engine, index, [(prompt, chat.message)])
    assert stats["cache_hits"] == 2 and stats["reused_tokens"] > 0


# compact and refine first pack texts with 500 tokens kept free for the answer; this window leaves ~70 tokens of
# context per call: less than the bridge node (~90 tokens), more than any short node (<= 40)
WINDOW = 700


@pytest.mark.parametrize("mode", ["compact", "refine"])
def test_split_texts_are_recomputed_and_whole_ones_reused(mode, index, engine, postprocessor, llm_calls):
    # a window this small makes LlamaIndex split the long bridge node into pieces, while short nodes stay whole
    llm = CacheBlendLLM(engine=engine, max_new_tokens=16, context_window=WINDOW)
    query_engine = index.as_query_engine(
        llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2, response_mode=mode
    )
    response = query_engine.query(BRIDGE)

    assert str(response).strip()
    assert len(llm_calls) >= 2
    stats = check_accounting(engine, index, llm_calls)
    prompts = [prompt for prompt, _ in llm_calls]
    bridge = next(i.node for i in response.source_nodes if i.node.metadata["topic"] == "bridge")
    bridge_text = bridge.get_content(metadata_mode=MetadataMode.LLM)
    assert not any(bridge_text in p for p in prompts), "expected the bridge node to be split"
    first, last = bridge_text.split(". ")[0], bridge_text.split(". ")[-1]
    assert any(first in p for p in prompts) and any(last in p for p in prompts)  # its pieces were computed
    assert any(s["cache_hits"] > 0 and s["reused_tokens"] > 0 for s in stats)  # the short node was reused


def test_streaming_pieces_join_to_the_answer(index, llm, postprocessor, llm_calls, reuse):
    streaming = index.as_query_engine(llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2, streaming=True)
    response = streaming.query(LIGHTHOUSE)
    pieces = list(response.response_gen)

    assert len([p for p in pieces if p]) > 1
    answer = "".join(pieces)
    assert "27" in answer
    assert answer == llm_calls[-1][1].text  # the last streamed response holds the whole text and the stats
    assert llm_calls[-1][1].additional_kwargs["reused_tokens"] > 0

    plain = index.as_query_engine(llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2)
    assert str(plain.query(LIGHTHOUSE)) == answer  # greedy: the same prompt gives the same answer
    assert reuse()["reused_tokens"] > 0


def test_async_query(index, llm, postprocessor, reuse):
    query_engine = index.as_query_engine(llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2)
    response = asyncio.run(query_engine.aquery(LIGHTHOUSE))

    assert "27" in str(response)
    counts = reuse()
    assert counts["requests"] == 1 and counts["reused_tokens"] > 0 and counts["cache_hits"] == 2
