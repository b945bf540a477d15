"""The FastAPI app: OpenAI-compatible completions over one CacheBlendEngine, chunk registration, health, metrics.

Every call into the engine runs on the scheduler's worker thread (``scheduler.py``: the requests decode in one
batch, a budget of one new request's prefill between two decoding steps); the event loop only parses, checks,
queues and streams, and prompts are rendered and tokenized for their checks on a small pool of their own. The
handlers live beside what they serve (``completions.py``, ``chunks.py``, ``info.py``) and share one
``ServerState`` (``state.py``); requests pass ``middleware.py`` first (counted, authenticated, body read within
its limits). Errors are OpenAI-style JSON (``errors.py``): 400 for a bad request, 401 without a valid key, 403
for what a key may not do, 404 for another model or path, 408 / 413 for a body too slow or too large, 429 for a
full queue or a spent quota, 503 when the engine ran out of memory or the server is stopping, 500 otherwise
(logged with its traceback); the server goes on.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..config import BlendConfig
from .access import Access
from .chunks import register_chunks
from .completions import chat_completions, completions
from .errors import ApiError, http_exception, unhandled
from .info import health, models, prometheus
from .middleware import Authenticate, CountRequests, ReadBody
from .options import ServerOptions
from .state import ServerState

ROUTES = (
    ("/v1/chat/completions", chat_completions, "POST"),
    ("/v1/completions", completions, "POST"),
    ("/v1/chunks", register_chunks, "POST"),
    ("/v1/models", models, "GET"),
    ("/health", health, "GET"),
    ("/metrics", prometheus, "GET"),
)


def create_app(
    engine,
    *,
    config: BlendConfig | None = None,
    api_keys=(),
    admin_key: str | None = None,
    registry_scope: str | None = None,
    reuse_stats: str = "private",
    **options,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine``.

    config: the BlendConfig of requests that send no ``cacheblend`` options (default: the engine's).
    api_keys, admin_key, registry_scope, reuse_stats: who may call, register and see reuse (``access.py``).
    options: ServerOptions fields (``options.py``): model_name, max_active, max_queue, kv_memory, prefill_budget,
    max_tokens, default_max_tokens, the size limits, quotas, body_timeout, shutdown_grace.
    To share chunks between replicas, give the engine a Redis tier and call ``share_registry(engine)`` first
    (``cacheblend serve`` does). Run it with ``cacheblend_rag.serve.serve`` (or ``server.build_server``) for
    the connection limits and header timeout, and for waiting requests to get 503 as soon as it is stopped.
    """
    access = Access(api_keys, admin_key, registry_scope, reuse_stats)
    state = ServerState(engine, ServerOptions.of(options), access, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="cacheblend", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.engine, app.state.scheduler, app.state.metrics = engine, state.scheduler, state.metrics
    for path, handler, method in ROUTES:
        app.add_api_route(path, handler, methods=[method], include_in_schema=False)
    app.add_exception_handler(HTTPException, http_exception)
    app.add_exception_handler(RequestValidationError, lambda request, exc: ApiError(400, str(exc)).response())
    app.add_exception_handler(Exception, unhandled)
    app.add_middleware(ReadBody, max_bytes=state.options.max_body_bytes, timeout=state.options.body_timeout)
    app.add_middleware(Authenticate, access=access)
    app.add_middleware(CountRequests, metrics=state.metrics)  # the outermost: counts every answer
    return app
