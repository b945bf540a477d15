"""Bad input gives an error that names the problem and the fix, on every entry point."""

from __future__ import annotations

import asyncio

import pytest
from langchain_cacheblend import CacheBlendLLM, CacheBlendRetriever, ChatCacheBlend
from langchain_core.messages import AIMessage, ChatMessage, FunctionMessage, HumanMessage, ToolMessage
from pydantic import ValidationError

from cacheblend_rag import BlendConfig


@pytest.fixture
def chat(tiny_engine):
    return ChatCacheBlend(engine=tiny_engine, max_tokens=4)


def test_empty_message_list(chat):
    with pytest.raises(ValueError, match="empty message list; pass at least one message"):
        chat.invoke([])
    with pytest.raises(ValueError, match="empty message list"):
        list(chat.stream([]))
    with pytest.raises(ValueError, match="empty message list"):
        asyncio.run(chat.ainvoke([]))


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (ToolMessage("42", tool_call_id="call-1"), "is a ToolMessage"),
        (FunctionMessage("42", name="add"), "is a FunctionMessage"),
        (ChatMessage(role="tool", content="42"), "is a ChatMessage with role 'tool'"),
    ],
)
def test_unsupported_message_type(chat, message, shown):
    messages = [HumanMessage("What is 6 times 7?"), message]
    with pytest.raises(TypeError, match=rf"messages\[1\] {shown}.*system, human and AI text messages only"):
        chat.invoke(messages)

    async def stream():
        return [c async for c in chat.astream(messages)]

    with pytest.raises(TypeError, match=r"messages\[1\]"):
        asyncio.run(stream())


def test_ai_message_with_tool_calls(chat):
    call = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "call-1"}])
    with pytest.raises(ValueError, match=r"messages\[0\] is an AIMessage with tool calls.*no tool calling"):
        chat.invoke([call, HumanMessage("and?")])


def test_non_text_content_block(chat):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    message = HumanMessage(content=[{"type": "text", "text": "What is in this picture?"}, image])
    with pytest.raises(ValueError, match=r"messages\[0\] content block 1 has type 'image_url'.*reads text only"):
        chat.invoke([message])


def test_text_blocks_are_joined(chat):
    blocks = HumanMessage(content=[{"type": "text", "text": "Name a "}, "colour."])
    plain = HumanMessage("Name a colour.")
    assert chat.invoke([blocks]).content == chat.invoke([plain]).content


def test_unknown_init_argument_is_rejected(tiny_engine):
    with pytest.raises(ValidationError, match="temprature"):
        ChatCacheBlend(engine=tiny_engine, temprature=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recompute_ratio": 1.5}, r"recompute_ratio must be a number in \[0, 1\], got 1.5"),
        ({"strategy": "fastest"}, "strategy must be one of"),
        ({"max_tokens": 0}, "greater than or equal to 1"),
        ({"temperature": -1}, "greater than or equal to 0"),
        ({"engine_kwargs": {"dtype": "float32"}}, "engine_kwargs only apply when the model loads its own engine"),
    ],
)
def test_bad_options_at_init(tiny_engine, kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ChatCacheBlend(engine=tiny_engine, **kwargs)


def test_bad_options_per_call(chat):
    with pytest.raises(TypeError, match=r"unsupported keyword argument\(s\) \['temprature'\].*per-call options"):
        chat.invoke("hi", temprature=0.5)
    with pytest.raises(ValueError, match="cannot switch to model='gpt-4o' per call"):
        chat.invoke("hi", model="gpt-4o")
    with pytest.raises(ValueError, match="recompute_ratio must be a number in"):
        chat.invoke("hi", recompute_ratio=2.0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0, or None for no limit; got -1"):
        chat.invoke("hi", timeout=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        chat.invoke("hi", max_tokens=0)
    with pytest.raises(TypeError, match=r"blend_config must be a cacheblend_rag\.BlendConfig"):
        chat.invoke("hi", blend_config={"strategy": "cacheblend"})
    assert (
        chat.invoke("hi", blend_config=BlendConfig(strategy="full_reuse")).response_metadata["cacheblend"]["strategy"]
        == "full_reuse"
    )


def test_engine_must_be_an_engine():
    with pytest.raises(ValidationError, match="CacheBlendEngine"):
        ChatCacheBlend(engine="smollm2-135m")


def test_llm_rejects_an_empty_prompt(tiny_engine):
    llm = CacheBlendLLM(engine=tiny_engine, max_tokens=4)
    with pytest.raises(ValueError, match="needs a non-empty prompt string"):
        llm.invoke("")


def test_retriever_needs_a_retriever_and_an_engine(tiny_engine):
    with pytest.raises(ValidationError, match="retriever"):
        CacheBlendRetriever(engine=tiny_engine)
    with pytest.raises(ValidationError, match="engine"):
        CacheBlendRetriever(retriever=ChatCacheBlend(engine=tiny_engine), engine=tiny_engine)
