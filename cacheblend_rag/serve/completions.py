"""``POST /v1/chat/completions`` and ``POST /v1/completions``: one path for both.

A request is parsed and checked on the event loop (model, sampling, blend options, the prompt's size in bytes),
its prompt rendered and counted in tokens off the engine's thread (a prompt past the context window is refused
before it queues), then queued; the scheduler's events become one JSON answer or a stream of server-sent
events. A client that leaves cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..config import BlendConfig
from ..engine.sampling import SamplingParams
from .errors import ApiError, ClientGone, api_error, client_closed, parse_body
from .options import BYTES_PER_TOKEN
from .responses import ChatFormat, CompletionFormat, sse
from .schemas import BadRequest, ChatCompletionRequest, CompletionRequest, blend_config
from .state import ServerState, caller_of, server_state

CLAMP_HEADER = "X-CacheBlend-Max-Tokens-Clamped"


@dataclass(frozen=True)
class Endpoint:
    """One completion endpoint: its path, body, response format, and how a body becomes the prompt string
    (``prompt(engine, body)`` returns the function that renders it, run off the engine's thread)."""

    path: str
    body: type
    format: type
    prompt: Callable[[object, object], Callable[[], str]]
    param: str


def _chat_prompt(engine, body: ChatCompletionRequest) -> Callable[[], str]:
    messages = body.engine_messages()
    return partial(engine.format_chat, messages)


def _text_prompt(engine, body: CompletionRequest) -> Callable[[], str]:
    text = body.text()
    return lambda: text


CHAT = Endpoint("/v1/chat/completions", ChatCompletionRequest, ChatFormat, _chat_prompt, "messages")
TEXT = Endpoint("/v1/completions", CompletionRequest, CompletionFormat, _text_prompt, "prompt")


@dataclass
class Prepared:
    """A checked request, ready to queue."""

    prompt: str
    config: BlendConfig
    sampling: SamplingParams
    notes: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


async def chat_completions(request: Request) -> Response:
    return await complete(request, CHAT)


async def completions(request: Request) -> Response:
    return await complete(request, TEXT)


async def complete(request: Request, endpoint: Endpoint) -> Response:
    state, caller = server_state(request), caller_of(request)
    try:
        body = await parse_body(request, endpoint.body)
        prepared = await prepare(state, body, endpoint)
    except ClientGone:
        return client_closed().response()
    except Exception as exc:  # a bad request (400, 404, 413), a full queue (429), the server stopping (503)
        return api_error(exc).response()
    fmt = endpoint.format(state.name, reveal=state.access.sees_reuse(caller), notes=prepared.notes)
    # A per-key registry scope (access.py) would pass the caller's scope to the engine here.
    job = partial(state.engine.stream, prompt=prepared.prompt, config=prepared.config, sampling=prepared.sampling)
    return await run(request, state, job, fmt, body, endpoint.path, prepared.headers)


async def prepare(state: ServerState, body, endpoint: Endpoint) -> Prepared:
    """Check ``body`` and build its prompt; raises ApiError / BadRequest naming what is wrong."""
    state.check_model(body.model)
    options = state.options
    sampling, asked = body.sampling(options.default_max_tokens, options.max_tokens)
    config = blend_config(state.config, body.cacheblend, state.engine.device)
    render = endpoint.prompt(state.engine, body)
    size = body.prompt_bytes()
    if size > options.max_prompt_bytes:
        raise prompt_too_large(size, options.max_prompt_bytes, state.engine.context_window, endpoint.param)
    state.scheduler.check_room()  # a full queue is refused before any tokenizing
    check = partial(checked_prompt, state.engine, render, endpoint.param, options.max_prompt_bytes)
    prompt = await state.off_thread(check)
    prepared = Prepared(prompt, config, sampling)
    if asked is not None:
        prepared.notes["max_tokens"] = {"requested": asked, "allowed": options.max_tokens}
        prepared.headers[CLAMP_HEADER] = f"{asked}->{options.max_tokens}"
    return prepared


def prompt_too_large(size: int, limit: int, context_window: int, param: str) -> ApiError:
    return ApiError(
        413,
        f"the prompt has {size} bytes; this server takes prompts of at most {limit} bytes (--max-prompt-bytes; "
        f"by default the context window of {context_window} tokens x {BYTES_PER_TOKEN}); shorten the prompt",
        code="prompt_too_large",
        param=param,
    )


def checked_prompt(engine, render: Callable[[], str], param: str, max_bytes: int) -> str:
    """The rendered prompt, if its bytes (the chat template's included) and then its tokens fit (runs off the
    engine's thread).

    The engine tokenizes it again on its thread (it takes a prompt string); the count here is the same
    tokenization, so only prompts the engine would refuse are refused here."""
    prompt = render()
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > max_bytes:  # e.g. many short messages: each adds the template's header
        raise prompt_too_large(size, max_bytes, engine.context_window, param)
    ids = engine.tokenize(prompt)
    bos = list(engine.bos_ids)
    n = len(ids) + (len(bos) if bos and ids[: len(bos)] != bos else 0)
    if n > engine.context_window:
        raise BadRequest(
            f"the prompt has {n} tokens but the model's context window is {engine.context_window}; "
            "retrieve fewer or shorter chunks, or shorten the prompt",
            param,
            "context_length_exceeded",
        )
    return prompt


async def run(request: Request, state: ServerState, job, fmt, body, path: str, headers: dict) -> Response:
    """Queue ``job`` (it returns the engine's GenerationStream) and answer with its result or stream."""
    try:
        ticket = state.scheduler.submit(job)
    except Exception as exc:  # QueueFull, SchedulerClosed
        return api_error(exc).response()
    watcher = asyncio.create_task(watch(request, ticket))
    handed_over = False
    try:
        kind, gen = await ticket.next_event()
        if kind != "started":  # the prefill failed, or the client left while queued, or the server is stopping
            return finished_early(kind, gen)
        if body.stream:
            handed_over = True
            events = stream(follow(state, ticket, path), ticket, watcher, gen, fmt, body.include_usage)
            headers = {"Cache-Control": "no-cache", **headers}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        async with contextlib.aclosing(follow(state, ticket, path)) as events:
            async for kind, value in events:
                if kind == "end":
                    return JSONResponse(fmt.full(gen.result), headers=headers)
                if kind != "piece":
                    return finished_early(kind, value)
        raise AssertionError("a job's events end with end, error or cancelled")
    finally:
        if not handed_over:
            watcher.cancel()
            ticket.cancel()


async def follow(state: ServerState, ticket, path: str) -> AsyncIterator[tuple[str, object]]:
    """A started ticket's events: each ("piece", text), then ("end", None), ("error", exc) or ("cancelled",
    None). Observes the time to the first piece (or the end) once."""
    observed = False
    while True:
        kind, value = await ticket.next_event()
        if not observed and kind in ("piece", "end"):
            observed = True
            if ticket.started_at is not None:
                state.metrics.queue_wait.observe(ticket.started_at - ticket.submitted)
            state.metrics.ttft.labels(path).observe(time.monotonic() - ticket.submitted)
        yield kind, value
        if kind != "piece":
            return


async def stream(events, ticket, watcher, gen, fmt, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the pieces, then the finish chunk (and usage) and ``[DONE]``, or an error event."""
    try:
        first = fmt.first_chunk()
        if first is not None:
            yield sse(first)
        async with contextlib.aclosing(events):
            async for kind, value in events:
                if kind == "piece":
                    yield sse(fmt.chunk(value))
                elif kind == "end":
                    result = gen.result
                    yield sse(fmt.last_chunk(result))
                    if include_usage:
                        yield sse(fmt.usage_chunk(result))
                    yield sse("[DONE]")
                elif kind == "error":
                    yield sse(api_error(value).body())
    finally:
        watcher.cancel()
        ticket.cancel()


def finished_early(kind: str, value) -> Response:
    if kind == "error":
        return api_error(value).response()
    return client_closed().response()


async def watch(request: Request, ticket) -> None:
    """Cancel the ticket when the client disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.cancel()
            return
