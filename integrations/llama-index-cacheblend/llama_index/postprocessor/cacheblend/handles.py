"""Chunk handles in node metadata: the text a node's KV is computed for, and where its handle is recorded.

The KV of a node is computed for exactly ``node.get_content(metadata_mode=MetadataMode.LLM)``: the string
LlamaIndex's response synthesizers put into the prompt, after the context it was ingested with (its neighbours'
texts, ``CacheBlendPrecompute(context=k)``; none by default). ``CacheBlendLLM`` finds that string again inside
the prompt (the engine's chunk registry) and reuses its KV. The handle goes into the node's metadata under
``HANDLE_METADATA_KEY``, a key excluded from the LLM and embedding views, so recording it changes neither
the prompt nor the embedding. The recorded handle carries the context's token ids, so a later process (a query
after the index was persisted) finds the same KV: ``recorded_handle`` rebuilds the handle from the node's text and
the recorded context, and uses it only if it gives the recorded key. A node that comes without one is computed
after the nodes retrieved with it (``CacheBlendNodePostprocessor(context=k)``) and registered.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core.schema import BaseNode, MetadataMode

from cacheblend_rag import CacheBlendEngine, ChunkHandle

HANDLE_METADATA_KEY = "cacheblend_kv"


def check_engine(engine: object) -> CacheBlendEngine:
    if not isinstance(engine, CacheBlendEngine):
        raise TypeError(
            f"engine must be a CacheBlendEngine, e.g. CacheBlendEngine.from_pretrained('smollm2-135m'); "
            f"got {type(engine).__name__}"
        )
    return engine


def exclude_handle_key(node: BaseNode) -> None:
    """Hide the handle key from the LLM and embedding views (before the LLM text is read)."""
    if HANDLE_METADATA_KEY not in node.excluded_llm_metadata_keys:
        node.excluded_llm_metadata_keys = [*node.excluded_llm_metadata_keys, HANDLE_METADATA_KEY]
    if HANDLE_METADATA_KEY not in node.excluded_embed_metadata_keys:
        node.excluded_embed_metadata_keys = [*node.excluded_embed_metadata_keys, HANDLE_METADATA_KEY]


def llm_text(node: BaseNode) -> str:
    """The text the LLM sees for ``node``, with the handle key already excluded."""
    exclude_handle_key(node)
    return node.get_content(metadata_mode=MetadataMode.LLM)


def record_handle(node: BaseNode, handle: ChunkHandle) -> None:
    node.metadata[HANDLE_METADATA_KEY] = handle.to_dict()


def node_handle_key(node: BaseNode) -> str | None:
    """The KV key recorded in ``node``'s metadata, or None."""
    value = node.metadata.get(HANDLE_METADATA_KEY)
    return value.get("key") if isinstance(value, dict) else None


MAX_CONTEXT_IDS = 1 << 20  # a recorded context longer than this is not read (no context window is that long)


def recorded_handle(engine: CacheBlendEngine, node: BaseNode, text: str) -> ChunkHandle | None:
    """The handle recorded in ``node``'s metadata at ingestion (computed after its context) if the node's LLM text
    ``text`` and the recorded context still give its recorded key, else None."""
    recorded = node.metadata.get(HANDLE_METADATA_KEY)
    if not isinstance(recorded, dict):
        return None
    context = recorded.get("context_ids")
    if (
        isinstance(context, list)
        and 0 < len(context) <= MAX_CONTEXT_IDS
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in context)
    ):
        handle = engine.handle(text, context_ids=context)
        if handle.key == recorded.get("key"):
            return handle
    return None


def node_handles(
    engine: CacheBlendEngine, nodes: Sequence[BaseNode], context: int = 0
) -> list[tuple[BaseNode, ChunkHandle]]:
    """(node, handle of its LLM text) for every node whose LLM text has tokens (an empty node has no KV), each KV
    stored and its text registered (``engine.attach``): the handle recorded at ingestion if it still holds, else
    the one the engine's registry holds for the text, else the text computed after the LLM texts of the
    ``context`` nodes before it among ``nodes`` (cyclic)."""
    kept, texts, recorded = [], [], []
    for i, node in enumerate(nodes):
        if not isinstance(node, BaseNode):
            raise TypeError(f"nodes[{i}] is a {type(node).__name__}; expected a LlamaIndex node (BaseNode)")
        text = llm_text(node)
        if engine.tokenize(text):
            kept.append(node)
            texts.append(text)
            recorded.append(recorded_handle(engine, node, text))
    return list(zip(kept, engine.attach(texts, context=context, handles=recorded)))
