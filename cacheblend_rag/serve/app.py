"""The FastAPI app: OpenAI-compatible completions over one CacheBlendEngine, chunk registration, health, metrics.

Every call into the engine runs on the scheduler's worker thread (``scheduler.py``), one prefill at a time;
the event loop only parses, queues and streams. Errors are OpenAI-style JSON: 400 for a bad request, 404 for
a model this server does not serve, 429 with Retry-After when the queue is full, 503 when the engine ran out
of memory or the server is stopping, 500 otherwise (logged with its traceback); the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import BlendConfig
from ..engine.shared_registry import SharedChunkRegistry
from .metrics import ServerMetrics
from .responses import ChatFormat, CompletionFormat, error_body, sse
from .scheduler import QueueFull, Scheduler, SchedulerClosed
from .schemas import BadRequest, ChatCompletionRequest, ChunksRequest, CompletionRequest, blend_config

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/chunks", "/v1/models", "/health", "/metrics")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers

    def response(self) -> JSONResponse:
        body = error_body(str(self), self.kind, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error for an exception raised while queueing or running a request."""
    import torch

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", "queue_full", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, SchedulerClosed):
        return ApiError(503, str(exc), "server_error", "shutting_down")
    if isinstance(exc, BadRequest):
        return ApiError(400, str(exc), "invalid_request_error", param=exc.param)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        logger.warning("a request ran out of memory: %s", exc)
        return ApiError(
            503,
            f"the engine ran out of memory on this request ({exc}); retry later or send a "
            "shorter prompt or fewer chunks",
            "server_error",
            "out_of_memory",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, (ValueError, TypeError)):  # the engine's checks of its input name the value and the fix
        return ApiError(400, str(exc), "invalid_request_error")
    logger.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


class CountRequests:
    """ASGI middleware: counts responses by endpoint and status (streamed ones included)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()


def create_app(
    engine,
    *,
    model_name: str | None = None,
    max_active: int = 4,
    max_queue: int = 32,
    default_max_tokens: int = 256,
    config: BlendConfig | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` as ``model_name`` (default: ``engine.name``).

    max_active: requests decoded by turns (each prefill still runs alone); max_queue: requests that may wait
    beyond those (then 429); default_max_tokens: when a request sets no max_tokens; config: the BlendConfig
    of requests that send no ``cacheblend`` options (default: the engine's). To share chunks between
    replicas, give the engine a Redis tier and call ``share_registry(engine)`` first (``cacheblend serve``
    does).
    """
    name = model_name or getattr(engine, "name", "cacheblend")
    base_config = config or engine.default_config
    shared = engine.registry if isinstance(engine.registry, SharedChunkRegistry) else None
    scheduler = Scheduler(max_active, max_queue, on_idle=shared.sync if shared is not None else None)
    metrics = ServerMetrics(engine, scheduler, shared.stats if shared is not None else None)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="cacheblend", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5]
        ]
        param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return JSONResponse(error_body("; ".join(parts), param=param or None), status_code=400)

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {name!r} (GET /v1/models)",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    def observe_first(ticket, endpoint: str) -> None:
        if ticket.started_at is not None:
            metrics.queue_wait.observe(ticket.started_at - ticket.submitted)
        metrics.ttft.labels(endpoint).observe(time.monotonic() - ticket.submitted)

    async def watch(request: Request, ticket) -> None:
        """Cancel the ticket when the client disconnects."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                ticket.cancel()
                return

    async def generate(request: Request, endpoint: str, start: Callable, fmt, body) -> Response:
        """Queue ``start`` (it returns the engine's GenerationStream) and answer with its result or stream."""
        try:
            ticket = scheduler.submit(start)
        except (QueueFull, SchedulerClosed) as exc:
            return api_error(exc).response()
        watcher = asyncio.create_task(watch(request, ticket))
        handed_over = False
        try:
            kind, gen = await ticket.next_event()
            if kind != "started":  # the prefill failed, or the client left while queued
                return finished_early(kind, gen)
            if body.stream:
                handed_over = True
                return StreamingResponse(
                    events(ticket, watcher, gen, fmt, endpoint, body.include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            observed = False
            while True:
                kind, value = await ticket.next_event()
                if not observed and kind in ("piece", "end"):
                    observe_first(ticket, endpoint)
                    observed = True
                if kind == "end":
                    return JSONResponse(fmt.full(gen.result))
                if kind != "piece":
                    return finished_early(kind, value)
        finally:
            if not handed_over:
                watcher.cancel()
                ticket.cancel()

    def finished_early(kind: str, value) -> Response:
        if kind == "error":
            return api_error(value).response()
        return ApiError(499, "the client closed the request", "invalid_request_error", "client_closed").response()

    async def events(ticket, watcher, gen, fmt, endpoint: str, include_usage: bool) -> AsyncIterator[str]:
        try:
            first = fmt.first_chunk()
            if first is not None:
                yield sse(first)
            observed = False
            while True:
                kind, value = await ticket.next_event()
                if not observed and kind in ("piece", "end"):
                    observe_first(ticket, endpoint)
                    observed = True
                if kind == "piece":
                    yield sse(fmt.chunk(value))
                    continue
                if kind == "end":
                    result = gen.result
                    yield sse(fmt.last_chunk(result))
                    if include_usage:
                        yield sse(fmt.usage_chunk(result))
                    yield sse("[DONE]")
                elif kind == "error":
                    err = api_error(value)
                    yield sse(error_body(str(err), err.kind, err.param, err.code))
                return
        finally:
            watcher.cancel()
            ticket.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            check_model(body.model)
            messages = body.engine_messages()
            sampling = body.sampling(default_max_tokens)
            blend = blend_config(base_config, body.cacheblend)
        except (ApiError, BadRequest) as exc:
            return api_error(exc).response()

        def start():
            return engine.stream(prompt=engine.format_chat(messages), config=blend, sampling=sampling)

        return await generate(request, "/v1/chat/completions", start, ChatFormat(name), body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            check_model(body.model)
            prompt = body.text()
            sampling = body.sampling(default_max_tokens)
            blend = blend_config(base_config, body.cacheblend)
        except (ApiError, BadRequest) as exc:
            return api_error(exc).response()

        def start():
            return engine.stream(prompt=prompt, config=blend, sampling=sampling)

        return await generate(request, "/v1/completions", start, CompletionFormat(name), body)

    @app.post("/v1/chunks")
    async def chunks(body: ChunksRequest, request: Request) -> Response:
        try:
            check_model(body.model)
        except ApiError as exc:
            return exc.response()
        if any(not text.strip() for text in body.texts):
            bad = next(i for i, text in enumerate(body.texts) if not text.strip())
            return ApiError(
                400, f"texts[{bad}] is empty; drop empty texts", "invalid_request_error", param=f"texts[{bad}]"
            ).response()

        def start():
            before = engine.metrics()["precomputed_chunks"]
            handles = engine.precompute(body.texts)
            return handles, engine.metrics()["precomputed_chunks"] - before

        try:
            ticket = scheduler.submit(start)
        except (QueueFull, SchedulerClosed) as exc:
            return api_error(exc).response()
        try:
            kind, value = await ticket.next_event()
            if kind != "started":
                return finished_early(kind, value)
        finally:
            ticket.cancel()
        handles, computed = value
        data = [{"object": "chunk", "index": i, "key": h.key, "n_tokens": h.n_tokens} for i, h in enumerate(handles)]
        return JSONResponse(
            {
                "object": "list",
                "model": name,
                "data": data,
                "computed": computed,
                "already_stored": len({h.key for h in handles}) - computed,
            }
        )

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": "cacheblend",
            "max_model_len": engine.context_window,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        """200 while serving. ``available``: False while a remote tier (or the shared registry) is backing off
        after a failed call; the server then works without it (its chunks are computed). Replicas share chunks
        only if their ``model_fingerprint`` (model, tokenizer, compute dtype) is the same."""
        tiers = [
            {"tier": t.name, "available": not (getattr(t, "health", None) is not None and t.health.down)}
            for t in engine.store.tiers
        ]
        registry = None
        if shared is not None:
            registry = {"available": not shared.health.down, **shared.stats()}
        queue = {
            "waiting": scheduler.waiting,
            "active": scheduler.active,
            "max_queue": scheduler.max_queue,
            "max_active": scheduler.max_active,
        }
        return {
            "status": "ok",
            "model": name,
            "queue": queue,
            "store": tiers,
            "shared_registry": registry,
            "registered_chunks": len(engine.registry),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "model_fingerprint": engine.fingerprint[:16],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
