"""``POST /v1/chat/completions`` and ``POST /v1/completions``: one path for both.

A request is parsed and checked on the event loop (model, sampling, blend options, the prompt's size in bytes),
its prompt tokenized off the engine's thread into the blocks the engine runs (chat contents as plain text, chunks
of the caller's registry scope found in it; a prompt past the context window is refused before it queues), then
queued; the scheduler's events become one JSON answer or a stream of server-sent
events. A client that leaves cancels its request. Strategy ``prefix_cache`` stores the prompt's blocks for later
requests of the scope, as registering does: a request that asks for it takes the right to register, and its blocks
count in the quota (not so where it is the server's default strategy: the operator's choice for every request).
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
from ..engine.batch_request import BatchRequest
from ..engine.sampling import SamplingParams
from ..engine.segments import ContextLengthExceeded
from .access import Caller
from .errors import ApiError, ClientGone, api_error, client_closed, parse_body
from .options import BYTES_PER_TOKEN
from .quota import prefix_cache_entries
from .responses import ChatFormat, CompletionFormat, sse
from .schemas import BadRequest, ChatCompletionRequest, CompletionRequest, blend_config
from .state import ServerState, caller_of, server_state

CLAMP_HEADER = "X-CacheBlend-Max-Tokens-Clamped"


@dataclass(frozen=True)
class Endpoint:
    """One completion endpoint: its path, body, response format, and what the body's text is for the engine
    (``text(body)``: ``{"messages": [...]}`` or ``{"prompt": "..."}``, the keywords of ``engine.blocks``)."""

    path: str
    body: type
    format: type
    text: Callable[[object], dict]
    param: str


CHAT = Endpoint(
    "/v1/chat/completions",
    ChatCompletionRequest,
    ChatFormat,
    lambda body: {"messages": body.engine_messages()},  # contents are tokenized as text: no forged turns
    "messages",
)
TEXT = Endpoint("/v1/completions", CompletionRequest, CompletionFormat, lambda body: {"prompt": body.text()}, "prompt")


@dataclass
class Prepared:
    """A checked request, ready to queue: its token blocks (chunks found in its registry scope) and the engine's
    BatchRequest over them."""

    blocks: list
    config: BlendConfig
    sampling: SamplingParams
    request: BatchRequest
    stores: bool = False  # it asked for prefix_cache: its blocks are stored for later requests
    notes: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


async def chat_completions(request: Request) -> Response:
    return await complete(request, CHAT)


async def completions(request: Request) -> Response:
    return await complete(request, TEXT)


async def complete(request: Request, endpoint: Endpoint) -> Response:
    state, caller = server_state(request), caller_of(request)
    charged: list[str] = []
    try:
        check = partial(endpoint.body.check_raw, max_items=state.engine.context_window)
        body = await parse_body(request, endpoint.body, check)
        scope = state.access.scope_of(caller)
        prepared = await prepare(state, body, endpoint, scope, caller)
        if prepared.stores:  # the prompt's blocks are stored for later requests: they count as chunks
            charged = state.quota.charge(caller, prefix_cache_entries(state.engine.fingerprint, prepared.blocks, scope))
    except ClientGone:
        return client_closed().response()
    except Exception as exc:  # a bad request (400, 403, 404, 413), a full queue or quota (429), stopping (503)
        return api_error(exc).response()
    fmt = endpoint.format(state.name, reveal=state.access.sees_reuse(caller), notes=prepared.notes)
    unstarted = partial(state.quota.refund, caller, charged)  # nothing was stored
    job = Job(prepared.request, caller.id)
    return await run(request, state, job, fmt, body, endpoint.path, prepared.headers, unstarted)


async def prepare(state: ServerState, body, endpoint: Endpoint, scope: str | None, caller: Caller) -> Prepared:
    """Check ``body`` and tokenize its prompt (chunks of registry ``scope`` found in it); raises ApiError /
    BadRequest naming what is wrong, Forbidden for a strategy ``caller`` may not use."""
    state.check_model(body.model)
    options = state.options
    sampling, asked = body.sampling(options.default_max_tokens, options.max_tokens)
    config = blend_config(state.config, body.cacheblend, state.engine.device)
    stores = config.strategy == "prefix_cache" and state.config.strategy != "prefix_cache"  # asked for
    if stores:
        state.access.check_prefix_cache(caller)
    text = endpoint.text(body)
    size = body.prompt_bytes()
    if size > options.max_prompt_bytes:
        raise prompt_too_large(size, options.max_prompt_bytes, state.engine.context_window, endpoint.param)
    state.scheduler.check_room()  # a full queue is refused before any tokenizing
    check = partial(checked_blocks, state.engine, text, scope, endpoint.param, options.max_prompt_bytes)
    blocks = await state.off_thread(check)
    job = BatchRequest(state.engine, blocks=blocks, config=config, sampling=sampling, scope=scope)
    prepared = Prepared(blocks, config, sampling, job, stores)
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


def checked_blocks(engine, text: dict, scope: str | None, param: str, max_bytes: int) -> list:
    """The prompt's token blocks, if its bytes (the chat template's included) and then its tokens fit (runs off the
    engine's thread: the engine then takes the blocks as they are)."""
    if "messages" in text:  # e.g. many short messages: each adds the template's header
        size = len(engine.format_chat(text["messages"]).encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise prompt_too_large(size, max_bytes, engine.context_window, param)
    try:
        return engine.blocks(**text, scope=scope)
    except ContextLengthExceeded as exc:
        raise BadRequest(str(exc), param, "context_length_exceeded") from None


@dataclass(frozen=True)
class Job:
    """What ``run`` queues: the engine's BatchRequest, and the caller whose turn it takes in the queue."""

    request: BatchRequest
    caller: str


async def run(
    request: Request, state: ServerState, job: Job, fmt, body, path: str, headers: dict, unstarted=None
) -> Response:
    """Queue ``job`` and answer with its result or stream; ``unstarted()`` is called if the job never started."""
    try:
        ticket = state.scheduler.submit(job.request, job.caller)
    except Exception as exc:  # QueueFull, SchedulerClosed
        if unstarted is not None:
            unstarted()
        return api_error(exc).response()
    watcher = asyncio.create_task(watch(request, ticket))
    handed_over = False
    try:
        kind, gen = await ticket.next_event()
        if kind != "started":  # the prefill failed, or the client left while queued, or the server is stopping
            if unstarted is not None and ticket.started_at is None:
                unstarted()
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
