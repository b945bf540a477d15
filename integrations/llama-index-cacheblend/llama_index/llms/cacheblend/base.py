"""CacheBlendLLM: a LlamaIndex LLM whose prompts reuse the stored KV cache of every registered chunk text."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from cacheblend_rag import BlendConfig, CacheBlendEngine, GenerationResult, GenerationStream, SamplingParams
from cacheblend_rag.engine.aio import iterate_in_thread
from cacheblend_rag.engine.batch_request import BatchRequest
from cacheblend_rag.engine.batch_worker import BatchHandle, batch_worker

# options a call may override: llm.complete(prompt, max_new_tokens=8, strategy="full_recompute")
CALL_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "strategy", "recompute_ratio")
# LlamaIndex's roles as the chat template knows them; other names of the same roles are mapped
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ROLES |= {"chatbot": "assistant", "model": "assistant"}
REMEMBERED = 64  # prompts this LLM's chat wrapping wrote, kept to send them as messages (LlamaIndex's predict)


class CacheBlendLLM(CustomLLM):
    """A LlamaIndex LLM over a ``CacheBlendEngine``: chunk texts found in the prompt reuse their stored KV.

    LlamaIndex hands an LLM one prompt string. The engine splits it at the chunk texts registered with it
    (by ``CacheBlendNodePostprocessor``, ``CacheBlendPrecompute`` or ``engine.precompute``), reuses their KV
    and blends it (``strategy="cacheblend"``: recompute the ``recompute_ratio`` of cached tokens whose KV
    deviates most); all other text is computed. Text that matches no chunk only costs speed, never quality.

    Completion prompts are wrapped in the model's chat template as one user message (``chat_template``; the
    system prompt, if set, becomes the system message); chat messages always use the chat template. Either way
    the engine gets the messages and reads each content as plain text: a control token written in a document or
    a message (``<|im_end|>``) is its characters and opens no turn. Roles: system, user and assistant
    (``developer`` is read as system, ``chatbot`` and ``model`` as assistant); tool and function messages, and
    messages without text, are refused with the fix (this LLM has no tool calling).
    ``metadata.context_window`` is ``context_window`` minus the tokens that wrapping adds, so LlamaIndex's
    prompt packing leaves room for it.

    Every response carries the request's blend statistics: ``response.additional_kwargs`` holds
    ``prompt_tokens``, ``reused_tokens``, ``recomputed_tokens``, ``cache_hits``, ``ttft_s``, ... and
    ``finish_reason``; ``response.raw`` holds ``usage`` (for LlamaIndex's token counting), ``cacheblend``
    (all stats) and ``token_ids``. Streaming yields the text pieces, then one last response with ``delta=""``
    that carries the statistics. ``acomplete``, ``achat``, ``astream_complete`` and ``astream_chat`` decode in the
    engine's shared batch: concurrent calls (a query engine with ``use_async=True``, ``asyncio.gather``) share each
    decoding step.
    """

    model_name: str = Field(default="", description="The engine's model (set from the engine).")
    context_window: int = Field(
        default=0,
        ge=0,
        description="Tokens of prompt + output the model takes; 0: the model's own context window.",
    )
    max_new_tokens: int = Field(default=256, gt=0, description="The most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed (None: not seeded).")
    stop: list[str] = Field(default_factory=list, description="Generation stops at the first of these strings.")
    strategy: Literal["cacheblend", "full_reuse", "prefix_cache", "full_recompute"] = Field(
        default="cacheblend", description="How the prompt's KV cache is assembled (see cacheblend_rag.BlendConfig)."
    )
    recompute_ratio: float = Field(
        default=0.15, ge=0.0, le=1.0, description="Fraction of the cached tokens cacheblend recomputes."
    )
    chat_template: bool | None = Field(
        default=None,
        description="Wrap completion prompts in the model's chat template; None: when the tokenizer has one.",
    )
    is_chat_model: bool = Field(
        default=False,
        description="Tell LlamaIndex to send chat messages (its chat prompts) instead of completion prompts.",
    )

    _engine: CacheBlendEngine = PrivateAttr()
    _wrapped: OrderedDict = PrivateAttr(default_factory=OrderedDict)  # prompt string -> its chat messages
    _wrapped_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, engine: CacheBlendEngine, **kwargs: Any) -> None:
        if not isinstance(engine, CacheBlendEngine):
            raise TypeError(
                "engine must be a CacheBlendEngine, e.g. CacheBlendEngine.from_pretrained('smollm2-135m'); "
                f"got {type(engine).__name__}"
            )
        has_template = bool(getattr(engine.tokenizer, "chat_template", None))
        chat_template = kwargs.pop("chat_template", None)
        if chat_template and not has_template:
            raise ValueError(
                f"chat_template=True but the tokenizer of {engine.name!r} has no chat template; "
                "pass chat_template=False (or None) to send prompts as they are"
            )
        window = kwargs.pop("context_window", None) or engine.context_window
        if isinstance(window, int) and window > engine.context_window:
            raise ValueError(
                f"context_window={window} is larger than the model's {engine.context_window} tokens; "
                "pass a smaller value or leave it unset"
            )
        own_completion = kwargs.get("completion_to_prompt") is not None
        own_messages = kwargs.get("messages_to_prompt") is not None
        kwargs.setdefault("model_name", engine.name)
        super().__init__(
            context_window=window,
            chat_template=has_template if chat_template is None else chat_template,
            **kwargs,
        )
        self._engine = engine
        if self.chat_template and not own_completion:
            self.completion_to_prompt = self._chat_completion_prompt
        if not own_messages:
            self.messages_to_prompt = self._chat_messages_prompt if has_template else generic_messages_to_prompt

    @classmethod
    def class_name(cls) -> str:
        return "CacheBlendLLM"

    def __repr_args__(self):
        # the default prompt formatters are this object's own methods: printing them would recurse
        hidden = ("completion_to_prompt", "messages_to_prompt")
        return [(name, value) for name, value in super().__repr_args__() if name not in hidden]

    @property
    def engine(self) -> CacheBlendEngine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window - self._wrapper_tokens(),
            num_output=self.max_new_tokens,
            is_chat_model=self.is_chat_model,
            model_name=self.model_name,
        )

    # ---- prompts ------------------------------------------------------------------------------------
    def _wraps_chat(self) -> bool:
        return self.completion_to_prompt == self._chat_completion_prompt

    def _wrapper_tokens(self) -> int:
        """Tokens the chat-template wrapping adds around a completion prompt (LlamaIndex does not count them)."""
        return len(self._engine.tokenize(self._chat_completion_prompt(""))) if self._wraps_chat() else 0

    def _chat_completion_messages(self, prompt: str) -> list[dict[str, str]]:
        if self.query_wrapper_prompt:
            prompt = self.query_wrapper_prompt.format(query_str=prompt)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return messages

    def _chat_completion_prompt(self, prompt: str) -> str:
        messages = self._chat_completion_messages(prompt)
        text = self._engine.format_chat(messages)
        with self._wrapped_lock:  # LlamaIndex's predict() sends this string back as a formatted prompt
            self._wrapped[text] = messages
            self._wrapped.move_to_end(text)
            while len(self._wrapped) > REMEMBERED:
                self._wrapped.popitem(last=False)
        return text

    def _chat_messages_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return self._engine.format_chat(chat_dicts(messages))

    def _extend_prompt(self, formatted_prompt: str) -> str:
        # the chat wrapping already placed the system prompt and query wrapper inside the template
        return formatted_prompt if self._wraps_chat() else super()._extend_prompt(formatted_prompt)

    def _request(self, prompt: str, formatted: bool) -> dict[str, Any]:
        """What ``engine.stream`` gets for a completion prompt: the chat messages when this LLM's own chat wrapping
        made (or makes) the prompt, so contents are read as text; otherwise the prompt string, as LlamaIndex's
        predict() would have formatted it."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not formatted:
            if self._wraps_chat():
                return {"messages": self._chat_completion_messages(prompt)}
            return {"prompt": self._extend_prompt(self.completion_to_prompt(prompt))}
        with self._wrapped_lock:
            messages = self._wrapped.get(prompt)
        return {"messages": messages} if messages is not None else {"prompt": prompt}

    def _call_options(self, overrides: dict[str, Any]) -> tuple[SamplingParams, BlendConfig]:
        """The request's sampling and blend options: the fields, with a call's ``overrides`` applied."""
        unknown = sorted(set(overrides) - set(CALL_OPTIONS))
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; CacheBlendLLM takes {', '.join(CALL_OPTIONS)}")
        opts = {name: overrides.get(name, getattr(self, name)) for name in CALL_OPTIONS}
        config = BlendConfig(strategy=opts.pop("strategy"), recompute_ratio=opts.pop("recompute_ratio"))
        return SamplingParams(**opts), config

    # ---- generation ---------------------------------------------------------------------------------
    def _batch_request(self, text: dict[str, Any], overrides: dict[str, Any]) -> BatchRequest:
        """A request for the engine's batch (its prompt tokenized here, off the event loop)."""
        sampling, config = self._call_options(overrides)
        return BatchRequest(self._engine, **text, sampling=sampling, config=config)

    def _start(self, prompt: str, formatted: bool, overrides: dict[str, Any]) -> GenerationStream:
        """Run the prefill (blending the cached chunks) and return the decoding stream."""
        sampling, config = self._call_options(overrides)
        return self._engine.stream(**self._request(prompt, formatted), sampling=sampling, config=config)

    def _complete(self, prompt: str, formatted: bool, overrides: dict[str, Any]) -> CompletionResponse:
        return _response(self._start(prompt, formatted, overrides).result)

    def _start_chat(self, messages: Sequence[ChatMessage], overrides: dict[str, Any]) -> GenerationStream:
        if self.messages_to_prompt != self._chat_messages_prompt:  # the caller's own formatting: a prompt string
            return self._start(self.messages_to_prompt(messages), True, overrides)
        sampling, config = self._call_options(overrides)
        return self._engine.stream(messages=chat_dicts(messages), sampling=sampling, config=config)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return _stream_responses(self._start(prompt, formatted, kwargs))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(_response(self._start_chat(messages, kwargs).result))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return stream_completion_response_to_chat_response(_stream_responses(self._start_chat(messages, kwargs)))

    # ---- async: the prefill and the decoding run in worker threads, never on the event loop; a consumer
    # that stops early stops the decoding (cacheblend_rag.engine.aio, as in the LangChain integration). acomplete
    # and achat, and their streaming forms, decode in the engine's shared batch (cacheblend_rag.engine.batch_worker):
    # calls made at once (a query engine's async fan-out, asyncio.gather) share each decoding step ---------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        request = await asyncio.to_thread(lambda: self._batch_request(self._request(prompt, formatted), kwargs))
        return _response(await _batched(self._engine, request))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        request = await asyncio.to_thread(lambda: self._batch_request(self._request(prompt, formatted), kwargs))
        handle = batch_worker(self._engine).submit(request)
        return iterate_in_thread(lambda: _batch_responses(handle))

    def _chat_text(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        """The request text of chat ``messages``: the messages for the template, or the caller's own formatting."""
        if self.messages_to_prompt != self._chat_messages_prompt:  # the caller's own formatting: a prompt string
            return self._request(self.messages_to_prompt(messages), True)
        return {"messages": chat_dicts(messages)}

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = await asyncio.to_thread(lambda: self._batch_request(self._chat_text(messages), kwargs))
        return completion_response_to_chat_response(_response(await _batched(self._engine, request)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = await asyncio.to_thread(lambda: self._batch_request(self._chat_text(messages), kwargs))
        handle = batch_worker(self._engine).submit(request)
        return astream_completion_response_to_chat_response(iterate_in_thread(lambda: _batch_responses(handle)))


def chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex chat messages -> ``[{"role": ..., "content": ...}]`` for the chat template (text messages only)."""
    out = []
    for i, message in enumerate(messages):
        role = message.role.value if hasattr(message.role, "value") else str(message.role)
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}] has role {role!r}; CacheBlendLLM has no tool or function calling and takes system, "
                "user and assistant messages. Put a tool's result in a user message, e.g. "
                "ChatMessage(role='user', content=f'Tool result: {result}')"
            )
        if message.content is None:
            raise ValueError(
                f"messages[{i}] ({role}) has no text (content=None: e.g. an assistant message holding only tool "
                "calls, or only images); CacheBlendLLM reads text only: give it text content or leave it out"
            )
        out.append({"role": ROLES[role], "content": message.content})
    return out


def _response(result: GenerationResult, delta: str | None = None) -> CompletionResponse:
    stats = result.stats.as_dict()
    usage = {
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["new_tokens"],
        "total_tokens": stats["prompt_tokens"] + stats["new_tokens"],
    }
    summary = {name: value for name, value in stats.items() if name != "layer_rows"}
    return CompletionResponse(
        text=result.text,
        delta=delta,
        raw={
            "usage": usage,
            "cacheblend": stats,
            "finish_reason": result.finish_reason,
            "token_ids": list(result.token_ids),
        },
        additional_kwargs={**summary, "finish_reason": result.finish_reason},
    )


async def _batched(engine: CacheBlendEngine, request: BatchRequest) -> GenerationResult:
    """``request`` decoded in the engine's shared batch, waited for in a worker thread; cancelled, it is stopped."""
    handle = batch_worker(engine).submit(request)
    async for _ in iterate_in_thread(lambda: handle):
        pass
    return handle.result


def _batch_responses(handle: BatchHandle) -> Iterator[CompletionResponse]:
    """A batched request's responses (``_responses``); closing early stops it at the batch's next step."""
    pieces = iter(handle)  # closed early, the handle stops the request its consumer left
    return _responses(pieces, lambda: handle.result, pieces.close)


def _stream_responses(stream: GenerationStream) -> Iterator[CompletionResponse]:
    """A stream's responses (``_responses``); closing early closes the stream (the engine stops decoding)."""
    return _responses(stream, lambda: stream.result, stream.close)


def _responses(
    pieces: Iterable[str], result: Callable[[], GenerationResult], close: Callable[[], None]
) -> Iterator[CompletionResponse]:
    """The pieces as responses (``text`` so far, ``delta``), then one with the statistics of ``result()``; ``close``
    runs at the end, or when the consumer stops early."""
    text = ""
    try:
        for piece in pieces:
            text += piece
            yield CompletionResponse(text=text, delta=piece)
        yield _response(result(), delta="")
    finally:
        close()
