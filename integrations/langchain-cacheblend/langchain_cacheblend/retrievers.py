"""CacheBlendRetriever: makes the documents another retriever returns reusable in the prompt."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from cacheblend_rag import CacheBlendEngine


class CacheBlendRetriever(BaseRetriever):
    """Wraps any retriever; stores and registers the KV of every document it returns.

    For each document the KV of its ``page_content`` is computed if the store does not have it yet (the first
    time, after the ``context`` documents returned before it: ``engine.attach``), and the text is registered with
    ``engine``, so a ChatCacheBlend or CacheBlendLLM on the same engine reuses it
    wherever the text appears verbatim in the prompt. The chunk's handle (``ChunkHandle.to_dict()``: key,
    token count, model fingerprint) is recorded in ``metadata[metadata_key]``. A document whose text the
    chain later reformats is simply computed instead of reused.

    Keyword arguments of ``invoke`` (e.g. ``k=5`` for a vector-store retriever) go to the wrapped retriever.
    Documents keep their order; the ones returned are copies (the wrapped retriever's documents are not
    modified). Documents with empty text are passed through without a handle.

    .. code-block:: python

        retriever = CacheBlendRetriever(retriever=vectorstore.as_retriever(), engine=llm.engine)
        chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    retriever: BaseRetriever
    """The retriever whose documents are made reusable."""
    engine: CacheBlendEngine
    """The engine of the model that reads the documents (e.g. ``llm.engine``)."""
    metadata_key: str = "cacheblend"
    """Metadata key of the chunk handle."""
    context: int = Field(default=2, ge=0)
    """A document whose text has no KV yet is computed after the ``context`` documents returned before it (cyclic),
    then registered, so later prompts reuse that KV whatever they retrieve with it; 0: alone. A chunk computed
    among the passages it is retrieved with keeps far more of full recompute's quality under reuse
    (``engine.attach``)."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        documents = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        return self.attach(documents)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        documents = await self.retriever.ainvoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        return await asyncio.to_thread(self.attach, documents)

    def attach(self, documents: list[Document]) -> list[Document]:
        """Precompute (if missing) and register each document's text; return copies with the handle."""
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise TypeError(
                    f"the wrapped retriever returned a {type(doc).__name__} at position {i}, not a Document"
                )
        texts = [doc.page_content for doc in documents if doc.page_content]
        handles = iter(self.engine.attach(texts, context=self.context))
        out = []
        for doc in documents:
            if not doc.page_content:
                out.append(doc.model_copy(deep=True))
                continue
            metadata = {**doc.metadata, self.metadata_key: next(handles).to_dict()}
            out.append(doc.model_copy(update={"metadata": metadata}))
        return out
