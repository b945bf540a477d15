"""Request bodies of the OpenAI-compatible API (pydantic), and what they become for the engine.

Fields the engine cannot honour are refused with a 400 that names them (n > 1, tools, logprobs, penalties,
echo, suffix, best_of), never silently ignored; fields that change nothing (user, metadata, ...) are ignored.
Blend options travel in the extra body field ``cacheblend``: any BlendConfig field, e.g. ``{"strategy":
"cacheblend", "recompute_ratio": 0.15}``: ``ChatOpenAI(extra_body={"cacheblend": {...}})`` in LangChain,
``OpenAILike(additional_kwargs={"extra_body": {"cacheblend": {...}}})`` in LlamaIndex.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import BlendConfig
from ..engine.sampling import SamplingParams


class BadRequest(ValueError):
    """A request the server refuses (400); ``param``: the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def blend_config(base: BlendConfig, options: dict[str, Any] | None) -> BlendConfig:
    """``base`` with the request's ``cacheblend`` options applied: any BlendConfig field (strategy,
    recompute_ratio, check_layers, selection, ...); an unknown field or a bad value is a 400 naming it."""
    if not options:
        return base
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        return base.replace(**changes)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"cacheblend: {exc}", "cacheblend") from None


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
    cacheblend: dict[str, Any] | None = None

    def sampling(self, default_max_tokens: int, max_tokens: int | None = None) -> SamplingParams:
        """The request's SamplingParams (greedy when temperature is absent or 0); ``max_tokens`` overrides the
        body's. A value the engine refuses is a 400 naming it."""
        if self.n not in (None, 1):
            raise BadRequest(f"n={self.n}: this server returns one choice per request; send n=1 or leave it out", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported; leave it out or send 0", name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported; leave it out", "logit_bias")
        if self.logprobs not in (None, False, 0):
            raise BadRequest("logprobs are not supported; leave logprobs out", "logprobs")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > 4:
            raise BadRequest(f"stop has {len(stop)} sequences; send at most 4", "stop")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens or self.max_tokens or default_max_tokens,
                temperature=self.temperature or 0.0,
                top_p=1.0 if self.top_p is None else self.top_p,
                seed=self.seed,
                stop=stop or None,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

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
    response_format: dict[str, Any] | None = None

    def engine_messages(self) -> list[dict]:
        if self.tools or self.functions:
            raise BadRequest("tools / functions are not supported by this server; leave them out", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise BadRequest(
                f"response_format {self.response_format.get('type')!r} is not supported; only text", "response_format"
            )
        return [m.as_engine_message(i) for i, m in enumerate(self.messages)]

    def sampling(self, default_max_tokens: int, max_tokens: int | None = None) -> SamplingParams:
        return super().sampling(default_max_tokens, max_tokens or self.max_completion_tokens)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

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


class ChunksRequest(BaseModel):
    """POST /v1/chunks: texts to precompute and register (the chunks later prompts will contain verbatim)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, max_length=1000)
    model: str | None = None
