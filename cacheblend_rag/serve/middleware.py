"""ASGI layers in front of the routes, outermost first: ``CountRequests`` (responses by endpoint and status),
``Authenticate`` (the caller from the API key; 401 before anything is read) and ``ReadBody`` (the whole body
read within ``body_timeout`` seconds and ``max_body_bytes``, else 408 / 413, then handed on in one piece)."""

from __future__ import annotations

import asyncio
import json

from .access import Access, Unauthorized
from .errors import ApiError, api_error
from .metrics import ServerMetrics

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/chunks", "/v1/models", "/health", "/metrics")
OPEN_PATHS = ("/health",)


async def send_error(send, error: ApiError, close: bool = True) -> None:
    """Send ``error`` as a whole response; ``close``: end the connection after it (the body was not read)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class CountRequests:
    """Counts responses by endpoint and status (streamed ones included)."""

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


class Authenticate:
    """Resolves the request's caller (``scope["cacheblend.caller"]``); 401 in OpenAI's shape without a valid key
    where one is needed (every path but /health)."""

    def __init__(self, app, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            try:
                scope["cacheblend.caller"] = self.access.caller(header.decode("latin-1"))
            except Unauthorized as exc:
                await send_error(send, api_error(exc))
                return
        await self.app(scope, receive, send)


class ReadBody:
    """Reads the whole request body before the app sees it: 413 past ``max_bytes`` (by Content-Length, or as
    it arrives), 408 if it takes longer than ``timeout`` seconds; the app then receives it as one message, and
    later ``receive`` calls reach the client (a disconnect)."""

    def __init__(self, app, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(scope, receive), self.timeout)
        except asyncio.TimeoutError:
            error = ApiError(
                408,
                f"the request body did not arrive within {self.timeout:g}s (--body-timeout); send it at once",
                code="request_timeout",
            )
            await send_error(send, error)
            return
        except ApiError as error:
            await send_error(send, error)
            return
        if body is None:  # the client left
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> bytes | None:
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large(int(length))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(size, partial=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int, partial: bool = False) -> ApiError:
        what = f"more than {size}" if partial else str(size)
        return ApiError(
            413,
            f"the request body has {what} bytes; this server takes at most {self.max_bytes} (--max-body-bytes)",
            code="request_too_large",
        )
