"""The HTTP connection layer under the app: uvicorn's h11 protocol with the limits it lacks, and log records
rate-limited so a flood cannot fill a disk.

uvicorn 0.54 times out idle keep-alive connections (``timeout_keep_alive``) but not a request's headers: a
client that opens a connection and sends half a request line holds it (and a file descriptor) forever, and once
the process runs out of descriptors asyncio logs every failed ``accept`` (hundreds of thousands of lines) and
nothing, not even /health, is answered. ``GuardedH11Protocol`` closes a connection that has not sent a whole
request head within ``header_timeout`` seconds (408), and answers a connection beyond ``max_connections`` with
a 503 at once (keep it well under the process's descriptor limit: ``ServerLimits.fitted``). The body's timeout
and size are the app's (``middleware.ReadBody``). Protocol errors are answered in OpenAI's JSON shape too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .responses import error_body

try:
    import resource
except ImportError:  # not on POSIX: no descriptor limit to fit
    resource = None

logger = logging.getLogger(__name__)
RESERVED_FDS = 64  # descriptors kept for the model's files, the store, Redis, logs


@dataclass(frozen=True)
class ServerLimits:
    """header_timeout: seconds from a connection's first byte (or from its opening) to the end of a request's
    headers; keep_alive_timeout: seconds an idle connection stays open between requests; max_connections:
    connections open at once (more are answered 503 and closed); backlog: connections the kernel queues for
    accepting, and the most accepted at once (asyncio accepts up to that many per turn of its loop, before any
    of them is refused, so they need descriptors too)."""

    header_timeout: float = 10.0
    keep_alive_timeout: int = 5
    max_connections: int = 256
    backlog: int = 128

    def __post_init__(self) -> None:
        if not self.header_timeout > 0 or not self.keep_alive_timeout > 0:
            raise ValueError("header_timeout and keep_alive_timeout must be > 0 seconds")
        for name in ("max_connections", "backlog"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def descriptors(self) -> int:
        """File descriptors these limits may need at once: the connections held, two turns of accepted ones
        (refused ones close a turn later), and the process's own (RESERVED_FDS)."""
        return self.max_connections + 2 * self.backlog + RESERVED_FDS

    def fitted(self) -> tuple[ServerLimits, str | None]:
        """These limits within the process's descriptor limit (the soft limit raised toward the hard one first):
        if it is still short, the backlog and max_connections are lowered, with a warning saying so."""
        if resource is None:
            return self, None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = self.descriptors
        if soft != resource.RLIM_INFINITY and soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY or soft >= need:
            return self, None
        room = max(3, soft - RESERVED_FDS)
        backlog = max(1, min(self.backlog, room // 4))
        fitted = replace(self, max_connections=max(1, room - 2 * backlog), backlog=backlog)
        return fitted, (
            f"--max-connections {self.max_connections} needs about {need} file descriptors but this process may "
            f"open {soft} (ulimit -n): serving at most {fitted.max_connections} connections (backlog "
            f"{fitted.backlog}); raise ulimit -n for more"
        )


def raw_response(status: int, reason: str, message: str, code: str, extra: tuple[str, ...] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection: an OpenAI-style error, for where h11 has no
    request to answer (before the headers arrived)."""
    body = json.dumps(error_body(message, "invalid_request_error" if status < 500 else "server_error", code=code))
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a connection limit and JSON protocol errors. Its limits
    come from ``config.limits`` (a ServerLimits; ``server.Config`` sets it)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ServerLimits = getattr(config, "limits", ServerLimits())
        self._header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            logger.warning(
                "refused a connection: %d open, the limit is %d (--max-connections)",
                len(self.connections) - 1,
                self.limits.max_connections,
            )
            message = f"the server has {self.limits.max_connections} connections open (--max-connections); retry later"
            self._close_with(
                raw_response(503, "Service Unavailable", message, "too_many_connections", ("retry-after: 1",))
            )
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # part of a request head (or nothing yet) after this data
            self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._close_with(raw_response(400, "Bad Request", f"invalid HTTP request: {msg}", "invalid_http"))

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:  # answering: not waiting for a head
            return
        logger.warning(
            "closed a connection that sent no whole request head within %gs (--header-timeout)",
            self.limits.header_timeout,
        )
        message = f"no whole request head arrived within {self.limits.header_timeout:g}s (--header-timeout)"
        self._close_with(raw_response(408, "Request Timeout", message, "request_timeout"))

    def _close_with(self, response: bytes) -> None:
        self._disarm_header_timer()
        self._unset_keepalive_if_required()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


class RateLimit(logging.Filter):
    """Lets at most ``burst`` records with the same logger, level and message template through per ``window``
    seconds; when a window ends with records dropped, the next record that passes says how many. ``clock``:
    seconds, monotonic."""

    def __init__(self, burst: int = 10, window: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple, list] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            dropped = entry[2] if entry is not None else 0
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 10_000:  # many distinct templates: forget the oldest half
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:5_000]:
                    del self._seen[old]
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar messages suppressed in the last {self.window:g}s]"
            return True
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False


# asyncio's failed accepts, uvicorn's protocol errors, this module's refusals, the server's 500s (not the
# access log: its lines share one template and are the record of what was served)
RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn.error", __name__, "cacheblend_rag.serve.errors")


def rate_limit_logs(burst: int = 10, window: float = 60.0) -> RateLimit:
    """Install one RateLimit on the loggers a flood of connections writes to (RATE_LIMITED_LOGGERS); returns
    it."""
    limit = RateLimit(burst, window)
    for name in RATE_LIMITED_LOGGERS:
        target = logging.getLogger(name)
        for old in [f for f in target.filters if isinstance(f, RateLimit)]:
            target.removeFilter(old)
        target.addFilter(limit)
    return limit
