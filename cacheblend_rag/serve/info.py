"""``GET /v1/models``, ``GET /health`` (no key needed) and ``GET /metrics`` (the operator's: the admin key when
one is set)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .access import Forbidden
from .errors import api_error
from .state import caller_of, server_state


async def models(request: Request) -> Response:
    state = server_state(request)
    card = {
        "id": state.name,
        "object": "model",
        "created": state.started,
        "owned_by": "cacheblend",
        "max_model_len": state.engine.context_window,
    }
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    """200 while serving. ``available``: False while a remote tier (or the shared registry) is backing off
    after a failed call; the server then works without it (its chunks are computed). Replicas share chunks
    only if their ``model_fingerprint`` (model, tokenizer, compute dtype) is the same."""
    state = server_state(request)
    engine, scheduler, shared = state.engine, state.scheduler, state.shared
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
    report = {
        "status": "ok",
        "model": state.name,
        "queue": queue,
        "store": tiers,
        "shared_registry": registry,
        "registered_chunks": len(engine.registry),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "model_fingerprint": engine.fingerprint[:16],
    }
    return JSONResponse(report)


async def prometheus(request: Request) -> Response:
    state = server_state(request)
    try:
        state.access.check_operator(caller_of(request))
    except Forbidden as exc:
        return api_error(exc).response()
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
