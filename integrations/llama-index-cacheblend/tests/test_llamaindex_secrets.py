"""A password in the engine's store URLs reaches no LlamaIndex repr, metadata, serialization, event or log."""

from __future__ import annotations

import logging
import socket

import pytest
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.llms.cacheblend import CacheBlendLLM
from llama_index.postprocessor.cacheblend import CacheBlendNodePostprocessor, CacheBlendPrecompute

from cacheblend_rag import CacheBlendEngine

pytestmark = pytest.mark.real_model

SECRET = "S3CRET"
PASSAGE = "The Corvin Tower in Lanford is 212 metres tall and was finished in 1997."


def test_store_passwords_are_never_shown(engine, tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: the Redis tier is unavailable, which gets logged
    store = ["memory://", f"redis://:{SECRET}@127.0.0.1:{port}/0?password={SECRET}"]
    secret_engine = CacheBlendEngine(engine.model, engine.tokenizer, store=store, cache_dir=tmp_path)
    llm = CacheBlendLLM(engine=secret_engine, max_new_tokens=2)
    postprocessor = CacheBlendNodePostprocessor(engine=secret_engine)
    precompute = CacheBlendPrecompute(engine=secret_engine)
    events = []

    class Recorder(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            events.append(event)

    recorder = Recorder()
    get_dispatcher().add_event_handler(recorder)
    try:
        with caplog.at_level(logging.DEBUG):
            nodes = precompute([TextNode(text=PASSAGE)])
            postprocessor.postprocess_nodes([NodeWithScore(node=nodes[0], score=1.0)])
            response = llm.complete(f"Context:\n{PASSAGE}\nQuestion: How tall?")
    finally:
        get_dispatcher().event_handlers.remove(recorder)
    assert events and "unavailable" in caplog.text
    shown = {
        "repr": repr(llm) + repr(postprocessor) + repr(precompute),
        "to_json": llm.to_json() + postprocessor.to_json() + precompute.to_json(),
        "metadata": repr(llm.metadata) + repr(nodes[0].metadata),
        "response": repr(response),
        "events": repr([e.model_dump() for e in events]),
        "engine": repr(secret_engine) + str(secret_engine.metrics()),
        "logs": caplog.text,
    }
    assert [where for where, text in shown.items() if SECRET in text] == []
