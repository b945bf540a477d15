"""Stock OpenAI clients, unchanged, against ``cacheblend serve`` over real HTTP on loopback, with the real
SmolLM2-135M: LangChain's ``ChatOpenAI`` in an LCEL RAG chain and LlamaIndex's ``OpenAILike`` in a query
engine, streamed and not. The passages are registered through ``/v1/chunks`` (as an ingestion job in another
process would), and every answer reuses them: ``usage.prompt_tokens_details.cached_tokens`` as the clients
report it, and the server's metrics. Offline: no tracing, no hub, the model's own tokenizer counts tokens.
SmolLM2-135M is small: answers are checked loosely (the passage's key word appears)."""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from cacheblend_rag import CacheBlendEngine, testing

from .conftest import metric, serving

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CORPUS = [  # the shared passages and three more
    *testing.PASSAGES,
    "Lake Baikal in Siberia is the deepest lake in the world, reaching a depth of 1,642 metres.",
    "Marie Curie was the first person to win two Nobel Prizes, in physics in 1903 and in chemistry in 1911.",
    "The Lighthouse of Varna was built in 1868. It stands 27 metres tall and its lamp can be seen 30 kilometres "
    "out at sea.",
]
MODEL = "smollm2-135m"


def words(text: str) -> set[str]:
    return {w.strip(".,?!").lower() for w in text.split() if len(w) > 3}


def retrieve(question: str, k: int = 2) -> list[str]:
    """The k passages sharing the most words with the question (a real, if simple, lexical retriever)."""
    return sorted(CORPUS, key=lambda p: -len(words(p) & words(question)))[:k]


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory, one_torch_thread):
    """SmolLM2 on one torch thread (steady on a busy 2-core machine, as the other real-model tests)."""
    root = tmp_path_factory.mktemp("stock-clients")
    return CacheBlendEngine.from_pretrained(
        str(smollm2_dir), device="cpu", dtype="float32", cache_dir=root, store=["memory://?max_bytes=1GB"]
    )


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, model_name=MODEL) as live:
        response = httpx.post(f"{live.url}/v1/chunks", json={"texts": CORPUS}, timeout=300)
        assert response.status_code == 200 and response.json()["computed"] == len(CORPUS)
        yield live


@pytest.fixture
def reuse(server):
    """``reuse()`` -> how the server's reuse counters moved since the test started (read from /metrics)."""
    names = (
        "cacheblend_engine_requests_total",
        "cacheblend_engine_reused_tokens_total",
        "cacheblend_engine_cache_hits_total",
        "cacheblend_engine_cache_misses_total",
    )

    def read() -> dict:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        return {name.removeprefix("cacheblend_engine_").removesuffix("_total"): metric(text, name) for name in names}

    before = read()
    return lambda: {k: v - before[k] for k, v in read().items()}


@pytest.fixture
def no_tracing(monkeypatch):
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.setenv(name, "false")


def test_langchain_chat_openai_in_an_lcel_chain(server, reuse, no_tracing):
    pytest.importorskip("langchain_openai", reason="pip install langchain-openai (make install does)")
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{server.url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=24,
        stream_usage=True,
        max_retries=0,
    )
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer the question using only the context. Give a short answer."),
            ("human", "Context:\n{context}\n\nQuestion: {question}"),
        ]
    )
    context = RunnableLambda(lambda q: "\n\n".join(retrieve(q)))
    chain = {"context": context, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()

    question = "Which is the highest mountain in Africa?"
    answer = chain.invoke(question)
    assert "kilimanjaro" in answer.lower()
    counts = reuse()
    assert counts["requests"] == 1 and counts["cache_hits"] == 2 and counts["cache_misses"] == 0
    assert counts["reused_tokens"] > 0

    streamed = list(chain.stream(question))
    assert len(streamed) > 1 and "".join(streamed) == answer  # greedy: the same answer, piece by piece
    assert reuse()["requests"] == 2 and reuse()["cache_hits"] == 4

    # the usage the client reports: cached_tokens = the reused tokens, streamed (stream_usage) and not
    messages = prompt.invoke({"context": "\n\n".join(retrieve(question)), "question": question})
    message = llm.invoke(messages)
    cached = message.usage_metadata["input_token_details"]["cache_read"]
    assert cached == message.response_metadata["token_usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    total = None
    for chunk in llm.stream(messages):
        total = chunk if total is None else total + chunk
    assert total.content == message.content and total.usage_metadata["input_token_details"]["cache_read"] == cached


def test_llamaindex_openai_like_in_a_query_engine(server, engine, reuse):
    if importlib.util.find_spec("llama_index.llms.openai_like") is None:
        pytest.skip("pip install llama-index-llms-openai-like (make install does)")
    import llama_index.core
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode
    from llama_index.llms.openai_like import OpenAILike
    from llama_index.postprocessor.cacheblend import minilm_embedding

    previous = llama_index.core.global_tokenizer
    Settings.tokenizer = engine.tokenize  # count tokens with the model's tokenizer: no tiktoken download
    try:
        splitter = SentenceSplitter(chunk_size=256, chunk_overlap=0)
        documents = [Document(text=p) for p in CORPUS]
        index = VectorStoreIndex.from_documents(documents, embed_model=minilm_embedding(), transformations=[splitter])
        texts = [node.get_content(metadata_mode=MetadataMode.LLM) for node in index.docstore.docs.values()]
        assert sorted(texts) == sorted(CORPUS)  # one node per passage: the registered chunks, verbatim
        llm = OpenAILike(
            model=MODEL,
            api_base=f"{server.url}/v1",
            api_key="unused",
            is_chat_model=True,
            context_window=2048,
            max_tokens=24,
            temperature=0,
            max_retries=0,
        )
        query_engine = index.as_query_engine(llm=llm, similarity_top_k=2)
        response = query_engine.query("How tall is the Lighthouse of Varna?")
        assert "27" in str(response)
        counts = reuse()
        assert counts["requests"] == 1 and counts["cache_hits"] == 2 and counts["cache_misses"] == 0
        assert counts["reused_tokens"] > 0

        streaming = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True)
        streamed = streaming.query("How tall is the Lighthouse of Varna?")
        pieces = list(streamed.response_gen)
        assert len(pieces) > 1 and "".join(pieces).strip() == str(response).strip()
        assert reuse()["requests"] == 2 and reuse()["cache_hits"] == 4

        completion = OpenAILike(
            model=MODEL,
            api_base=f"{server.url}/v1",
            api_key="unused",
            is_chat_model=False,
            context_window=2048,
            max_tokens=8,
            temperature=0,
            max_retries=0,
        )
        # a chunk is never reused as the prompt's first token (engine/placement.py): text comes first
        raw = completion.complete(f"Read:\n{CORPUS[3]}\nQuestion: which lake is the deepest?\nAnswer:").raw
        assert raw.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        llama_index.core.global_tokenizer = previous
