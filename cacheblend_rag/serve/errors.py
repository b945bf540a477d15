"""Every error the server sends, in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): request
bodies parsed here (bad JSON, bad fields: 400 naming the field), the exceptions of queueing and running a
request mapped to their status, and Starlette's own errors (404 / 405 routes, anything unhandled) reshaped."""

from __future__ import annotations

import json
import logging

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .access import Forbidden, Unauthorized
from .quota import QuotaExceeded
from .responses import error_body
from .scheduler import QueueFull, SchedulerClosed
from .schemas import BadRequest

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error answer: status, message, OpenAI ``type``, ``code``, ``param``, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its request could be answered."""


def queue_full(exc: QueueFull) -> ApiError:
    message = (
        f"the server is busy: {exc.running} requests are running or starting (--max-active {exc.max_active}) and "
        f"{exc.waiting} are waiting, the queue's limit (--max-queue {exc.max_queue}); retry in {exc.retry_after}s"
    )
    return ApiError(429, message, "rate_limit_error", "queue_full", headers={"Retry-After": str(exc.retry_after)})


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error for an exception raised while checking, queueing or running a request."""
    import torch

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return queue_full(exc)
    if isinstance(exc, SchedulerClosed):
        return ApiError(503, str(exc), "server_error", "shutting_down", headers={"Retry-After": "1"})
    if isinstance(exc, Unauthorized):
        return ApiError(401, str(exc), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, Forbidden):
        return ApiError(403, str(exc), "permission_error", "permission_denied")
    if isinstance(exc, QuotaExceeded):  # no Retry-After: a quota is not a wait
        return ApiError(429, str(exc), "insufficient_quota", "insufficient_quota")
    if isinstance(exc, BadRequest):
        return ApiError(400, str(exc), param=exc.param, code=exc.code)
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
        return ApiError(400, str(exc))
    logger.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def client_closed() -> ApiError:
    return ApiError(499, "the client closed the request", code="client_closed")


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


async def parse_body(request: Request, model: type[BaseModel], check=None) -> BaseModel:
    """The request's JSON body as ``model``; raises ApiError 400 naming what is wrong (or ClientGone). ``check``: called
    with the parsed JSON object before it is validated (to refuse, cheaply, what would take long to validate)."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text; send JSON encoded in UTF-8") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno} (byte {exc.pos})"
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} at {where}") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    if check is not None:
        check(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming each field pydantic refused (the first five) and their values' problems."""
    errors = exc.errors(include_url=False)
    parts, params = [], []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        params.append(loc or None)
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return ApiError(400, "; ".join(parts), param=params[0] if params else None)


async def http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own HTTP errors (an unknown path, a method a path does not take) in OpenAI's shape."""
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}; see GET /v1/models and docs/SERVE.md"
        code = "not_found"
    elif exc.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=exc.headers)


async def unhandled(request: Request, exc: Exception) -> JSONResponse:
    """The last resort: a bug in the server. 500 in OpenAI's shape (Starlette logs the traceback)."""
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
