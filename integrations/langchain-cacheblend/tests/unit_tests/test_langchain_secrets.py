"""Passwords in store URLs never reach a repr, a serialized payload, a trace, a log or an error."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from langchain_cacheblend import CacheBlendLLM, ChatCacheBlend
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumpd
from pydantic import ValidationError

SECRET = "S3CRET"
PASSAGE = "The Corvin Tower in Lanford is 212 metres tall and was finished in 1997."


class Recorder(BaseCallbackHandler):
    """Everything a callback or tracer (LangSmith's included) is handed."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_chat_model_start(self, serialized, messages, **kwargs):
        self.seen.append((serialized, messages, kwargs))

    def on_llm_start(self, serialized, prompts, **kwargs):
        self.seen.append((serialized, prompts, kwargs))

    def on_llm_end(self, response, **kwargs):
        self.seen.append((response, kwargs))


@pytest.fixture
def tiny_folder(tmp_path, make_tiny_engine):
    """The tiny random model as a model folder, for ``model=...`` (the models load their own engine)."""
    engine = make_tiny_engine()
    folder = tmp_path / "tiny"
    engine.model.save_pretrained(folder)
    engine.tokenizer.save_pretrained(folder)
    return folder


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cls", [ChatCacheBlend, CacheBlendLLM])
def test_store_passwords_are_never_shown(cls, tiny_folder, tmp_path, caplog):
    port = closed_port()  # nothing listens: the Redis tiers are unavailable, which gets logged
    kwargs = {
        "store": [
            "memory://",
            f"redis://:{SECRET}@127.0.0.1:{port}/0",
            f"redis://127.0.0.1:{port}/1?password={SECRET}&ttl=1h",
        ],
        "device": "cpu",
        "dtype": "float32",
        "cache_dir": str(tmp_path / "cache"),
    }
    llm = cls(model=str(tiny_folder), engine_kwargs=kwargs, max_tokens=2)
    recorder = Recorder()
    with caplog.at_level(logging.DEBUG):
        llm.engine.precompute([PASSAGE])  # store lookups: the Redis tiers are tried
        llm.invoke(f"Read:\n{PASSAGE}\nQ?", config={"callbacks": [recorder]})
        list(llm.stream("Hello", config={"callbacks": [recorder]}))
    assert len(recorder.seen) >= 4 and "unavailable" in caplog.text
    shown = {
        "repr": repr(llm),
        "str": str(llm),
        "serialized": json.dumps(dumpd(llm)),
        "model_dump": str(llm.model_dump()),
        "model_dump_json": llm.model_dump_json(),
        "identifying params": str(llm._identifying_params),
        "LangSmith params": str(llm._get_ls_params()),
        "callbacks": repr(recorder.seen),
        "logs": caplog.text,
    }
    assert [where for where, text in shown.items() if SECRET in text] == []
    assert f"redis://:***@127.0.0.1:{port}/0" in shown["repr"] and "password=***&ttl=1h" in shown["serialized"]
    assert llm.engine_kwargs == kwargs  # the engine itself got the real URLs


@pytest.mark.parametrize(
    "url", [f"redis://:{SECRET}@127.0.0.1/0?ttl=bad", f"redis://127.0.0.1/0?password={SECRET}&ttl=bad"]
)
def test_validation_errors_never_echo_the_password(url, tiny_folder, tmp_path):
    kwargs = {"store": ["memory://", url], "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ValidationError, match="bad ttl='bad'") as info:
        ChatCacheBlend(model=str(tiny_folder), engine_kwargs=kwargs)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    with pytest.raises(ValidationError, match="temperature") as info:
        ChatCacheBlend(model=str(tiny_folder), engine_kwargs=kwargs, temperature=-1)
    assert SECRET not in str(info.value)
