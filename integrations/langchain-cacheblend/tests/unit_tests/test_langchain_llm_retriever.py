"""CacheBlendLLM and CacheBlendRetriever on a tiny random model."""

from __future__ import annotations

import asyncio

import pytest
from langchain_cacheblend import CacheBlendLLM, CacheBlendRetriever
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever


class KeywordRetriever(BaseRetriever):
    """Returns the documents sharing a word with the query, most shared words first (ties keep corpus order)."""

    documents: list[Document]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        words = set(query.lower().split())
        scored = [(len(words & set(d.page_content.lower().split())), i) for i, d in enumerate(self.documents)]
        return [self.documents[i] for score, i in sorted(scored, key=lambda s: (-s[0], s[1])) if score > 0][:k]


@pytest.fixture
def corpus(passages):
    return [Document(page_content=text, metadata={"source": f"doc-{i}"}, id=str(i)) for i, text in enumerate(passages)]


def test_retriever_precomputes_registers_and_records_handles(make_tiny_engine, corpus):
    engine = make_tiny_engine()
    retriever = CacheBlendRetriever(retriever=KeywordRetriever(documents=corpus), engine=engine)
    query = "which river passes through ten countries to the Black Sea"
    inner = KeywordRetriever(documents=corpus).invoke(query)
    docs = retriever.invoke(query)
    assert [d.id for d in docs] == [d.id for d in inner] and len(docs) >= 2  # same documents, same order
    texts = [d.page_content for d in docs]
    # each new document computed after the 2 returned before it (cyclic)
    contexts = [[texts[(i - j) % len(texts)] for j in range(min(2, len(texts) - 1), 0, -1)] for i in range(len(texts))]
    for doc, original, context in zip(docs, inner, contexts):
        handle = engine.handle(doc.page_content, context_ids=[t for c in context for t in engine.tokenize(c)])
        assert handle.context_ids
        assert doc.page_content == original.page_content
        assert doc.metadata == {**original.metadata, "cacheblend": handle.to_dict()}
        assert "cacheblend" not in original.metadata  # the wrapped retriever's documents are not modified
        assert engine.store.contains(handle.key)
        assert engine.registry.lookup(doc.page_content) == handle
    assert engine.metrics()["precomputed_chunks"] == len(docs)
    retriever.invoke(query)  # stored already: nothing is computed again
    assert engine.metrics()["precomputed_chunks"] == len(docs)
    assert engine.metrics()["precompute_cache_hits"] == len(docs)


def test_retriever_async_and_edge_cases(make_tiny_engine, corpus):
    engine = make_tiny_engine()
    blank = Document(page_content="", metadata={"source": "blank"})
    retriever = CacheBlendRetriever(
        retriever=KeywordRetriever(documents=[*corpus, blank]), engine=engine, metadata_key="kv"
    )
    docs = asyncio.run(retriever.ainvoke("highest mountain in Africa"))
    assert docs and all(d.metadata["kv"] == engine.registry.lookup(d.page_content).to_dict() for d in docs)
    alone = CacheBlendRetriever(retriever=KeywordRetriever(documents=corpus), engine=make_tiny_engine(), context=0)
    assert all(d.metadata["cacheblend"] == alone.engine.handle(d.page_content).to_dict() for d in alone.invoke("river"))
    assert retriever.invoke("zebra") == []
    assert len(retriever.invoke("the river", k=1)) == 1  # invoke kwargs reach the wrapped retriever
    assert retriever.attach([blank, corpus[0]])[0] == blank  # empty text: passed through, no handle


def test_llm_matches_the_engine_and_streams(tiny_engine):
    llm = CacheBlendLLM(engine=tiny_engine, max_tokens=6)
    prompt = "Question: what is the tallest mountain in Africa?\nAnswer:"
    text = llm.invoke(prompt)
    assert text == tiny_engine.generate(prompt=prompt, max_new_tokens=6).text
    pieces = list(llm.stream(prompt))
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert asyncio.run(llm.ainvoke(prompt)) == text

    async def astream():
        return [p async for p in llm.astream(prompt)]

    assert "".join(asyncio.run(astream())) == text
    assert llm.batch([prompt, prompt]) == [text, text]


def test_llm_reports_usage_and_streams_callbacks(make_tiny_engine, passages):
    engine = make_tiny_engine()
    engine.precompute(passages)
    tokens = []

    class Recorder(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs) -> None:
            tokens.append(token)

    llm = CacheBlendLLM(engine=engine, max_tokens=5, streaming=True, callbacks=[Recorder()])
    result = llm.generate(["\n".join(passages) + "\nWhich river is the largest?"])
    generation = result.generations[0][0]
    assert "".join(tokens) == generation.text and len(tokens) > 1
    info = generation.generation_info
    usage = info["usage_metadata"]
    assert usage["input_token_details"]["cache_read"] == info["cacheblend"]["reused_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert result.llm_output["token_usage"]["cache_read"] == usage["input_token_details"]["cache_read"]
    assert llm.get_num_tokens(passages[0]) == len(engine.tokenize(passages[0]))
