"""Request bodies of the OpenAI-compatible API (pydantic), and what they become for the engine.

Fields the engine cannot honour are refused with a 400 that names them (n > 1, tools, tool_choice,
function_call, parallel_tool_calls, logprobs, top_logprobs, penalties, echo, suffix, best_of), never silently
ignored; fields that change nothing (user, metadata, ...) are ignored. A temperature or top_p below
``GREEDY_BELOW`` is greedy decoding (as vLLM does): such a distribution is the top token, and dividing the
logits by it would overflow.
Blend options travel in the extra body field ``cacheblend``: any BlendConfig field, e.g. ``{"strategy":
"cacheblend", "recompute_ratio": 0.15}``: ``ChatOpenAI(extra_body={"cacheblend": {...}})`` in LangChain,
``OpenAILike(additional_kwargs={"extra_body": {"cacheblend": {...}}})`` in LlamaIndex.

Validating a body runs on the event loop, which answers nothing else meanwhile (pydantic holds the GIL): a 15 MB
body of 400,000 one-letter messages held it for seconds. So each request's ``check_raw`` first refuses, on the
parsed JSON, the lists no request that fits the context window has (more messages or content parts than it has
tokens, more stop sequences or prompts than are served).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import BlendConfig
from ..engine.sampling import GREEDY_BELOW, SamplingParams
from ..kernels.backend import resolve_backend

MAX_STOP = 4  # stop sequences per request


class BadRequest(ValueError):
    """A request the server refuses (400); ``param``: the field at fault; ``code``: OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def blend_config(base: BlendConfig, options: dict[str, Any] | None, device=None) -> BlendConfig:
    """``base`` with the request's ``cacheblend`` options applied: any BlendConfig field (strategy,
    recompute_ratio, check_layers, selection, ...); an unknown field or a bad value is a 400 naming it, and so is
    a kernel backend this server's ``device`` cannot run."""
    config = base
    if options:
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        try:
            config = base.replace(**changes)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"cacheblend: {exc}", "cacheblend") from None
    if device is not None:
        try:
            resolve_backend(config.backend, device)
        except (RuntimeError, ValueError) as exc:
            raise BadRequest(f"cacheblend.backend: {exc}", "cacheblend.backend") from None
    return config


def _refuse(name: str, value: Any, what: str) -> None:
    if value is not None:
        raise BadRequest(f"{name} is not supported: {what}; leave {name} out", name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    cacheblend: dict[str, Any] | None = None

    @classmethod
    def check_raw(cls, data: dict, max_items: int) -> None:
        """Refuse, before validating ``data`` (the parsed body), lists longer than any request that fits a context
        window of ``max_items`` tokens has (module docstring)."""
        stop = data.get("stop")
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise BadRequest(f"stop has {len(stop)} sequences; send at most {MAX_STOP}", "stop")

    def sampling(self, default_max_tokens: int, cap: int) -> tuple[SamplingParams, int | None]:
        """The request's SamplingParams (greedy when temperature is absent or 0) and, if it asked for more than
        ``cap`` tokens, what it asked for (its max_tokens is then ``cap``). A value the engine refuses is a 400
        naming it."""
        if self.n not in (None, 1):
            raise BadRequest(f"n={self.n}: this server returns one choice per request; send n=1 or leave it out", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported; leave it out or send 0", name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported; leave it out", "logit_bias")
        if self.logprobs not in (None, False, 0):
            raise BadRequest("logprobs are not supported; leave logprobs out", "logprobs")
        _refuse("top_logprobs", self.top_logprobs, "this server returns no log probabilities")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > MAX_STOP:
            raise BadRequest(f"stop has {len(stop)} sequences; send at most {MAX_STOP}", "stop")
        asked = self.asked_max_tokens()
        clamped = asked if asked is not None and asked > cap else None
        temperature = self.temperature or 0.0
        top_p = 1.0 if self.top_p is None else self.top_p
        if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:  # the top token: greedy, without overflow
            temperature, top_p = 0.0, 1.0
        try:
            params = SamplingParams(
                max_new_tokens=min(asked, cap) if asked is not None else default_max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=self.seed,
                stop=stop or None,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return params, clamped

    def asked_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None

    def as_engine_message(self, index: int) -> dict:
        if self.tool_calls:
            raise BadRequest(f"messages[{index}] has tool_calls; this server does not run tools", f"messages[{index}]")
        if self.content is None:
            raise BadRequest(f"messages[{index}] has no content", f"messages[{index}].content")
        if isinstance(self.content, str):
            text = self.content
        else:
            kinds = sorted({p.type for p in self.content if p.type != "text" or p.text is None})
            if kinds:
                raise BadRequest(
                    f"messages[{index}] has {', '.join(kinds)} content; this server takes text only",
                    f"messages[{index}].content",
                )
            text = "".join(p.text or "" for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: dict[str, Any] | None = None

    @classmethod
    def check_raw(cls, data: dict, max_items: int) -> None:
        super().check_raw(data, max_items)
        messages = data.get("messages")
        if not isinstance(messages, list):
            return
        parts = len(messages)  # a message of content parts counts as its parts
        if parts <= max_items:
            parts = sum(
                len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1 for m in messages
            )
        if parts > max_items:
            raise BadRequest(
                f"the messages have {parts} messages or content parts, more than a prompt of at most {max_items} "
                "tokens (the model's context window) can hold; send fewer",
                "messages",
                "context_length_exceeded",
            )

    def engine_messages(self) -> list[dict]:
        if self.tools or self.functions:
            raise BadRequest("tools / functions are not supported by this server; leave them out", "tools")
        for name in ("tool_choice", "function_call", "parallel_tool_calls"):
            _refuse(name, getattr(self, name), "this server does not run tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise BadRequest(
                f"response_format {self.response_format.get('type')!r} is not supported; only text", "response_format"
            )
        return [m.as_engine_message(i) for i, m in enumerate(self.messages)]

    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_bytes(self) -> int:
        """UTF-8 bytes of the messages' text (what the prompt is made of, the template aside)."""
        total = 0
        for m in self.messages:
            parts = [m.content] if isinstance(m.content, str) else [p.text or "" for p in m.content or ()]
            total += sum(len(p.encode("utf-8", "surrogatepass")) for p in parts)
        return total


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @classmethod
    def check_raw(cls, data: dict, max_items: int) -> None:
        super().check_raw(data, max_items)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1:
            raise BadRequest(f"prompt is a list of {len(prompt)} texts; send one prompt per request", "prompt")

    def text(self) -> str:
        if self.echo:
            raise BadRequest("echo is not supported; leave it out", "echo")
        if self.suffix:
            raise BadRequest("suffix is not supported; leave it out", "suffix")
        if self.best_of not in (None, 1):
            raise BadRequest("best_of is not supported; leave it out", "best_of")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise BadRequest(f"prompt is a list of {len(self.prompt)} texts; send one prompt per request", "prompt")
            return self.prompt[0]
        return self.prompt

    def prompt_bytes(self) -> int:
        prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        return sum(len(p.encode("utf-8", "surrogatepass")) for p in prompts)


MAX_CHUNK_CONTEXT = 4  # texts a chunk may be computed after: each costs about one more chunk's compute


class ChunksRequest(BaseModel):
    """POST /v1/chunks: texts to precompute and register (the chunks later prompts will contain verbatim)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1)
    model: str | None = None
    context: int = Field(default=2, ge=0, le=MAX_CHUNK_CONTEXT)
    """Each text's KV is computed after its ``context`` lexically nearest others in ``texts`` (as
    ``engine.precompute`` picks them; trimmed to fit the context window): chunks computed among the passages of
    their corpus nearest to them keep far more of full recompute's quality under reuse than chunks computed alone
    (0)."""

    def check(self) -> None:
        """Raise BadRequest for an empty text."""
        for i, text in enumerate(self.texts):
            if not text.strip():
                raise BadRequest(f"texts[{i}] is empty; drop empty texts", f"texts[{i}]")

    def text_bytes(self) -> int:
        return sum(len(t.encode("utf-8", "surrogatepass")) for t in self.texts)
