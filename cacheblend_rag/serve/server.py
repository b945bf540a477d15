"""Running the app: a uvicorn server with the connection layer of ``protocol.py`` and a shutdown that tells the
app first.

On SIGTERM (or Ctrl-C) uvicorn stops listening, closes idle connections and waits for the running requests;
only then would the app's lifespan hear of it, so requests waiting for the engine would sit out the whole
grace period and be cut. ``Server.shutdown`` tells the app at once (``ServerState.begin_shutdown``): waiting
requests get 503 in OpenAI's shape, running ones get ``shutdown_grace`` seconds to finish and then end with a
503 (or an error event in a stream); uvicorn's own limit comes 5 seconds later, as a backstop.
"""

from __future__ import annotations

import logging

import uvicorn

from .protocol import GuardedH11Protocol, ServerLimits, rate_limit_logs

logger = logging.getLogger(__name__)


class Config(uvicorn.Config):
    """uvicorn's Config carrying the ServerLimits its protocol reads."""

    def __init__(self, app, *, limits: ServerLimits, **kwargs) -> None:
        super().__init__(
            app,
            http=GuardedH11Protocol,
            timeout_keep_alive=limits.keep_alive_timeout,
            backlog=limits.backlog,
            **kwargs,
        )
        self.limits = limits


class Server(uvicorn.Server):
    """uvicorn's Server that awaits ``on_shutdown()`` (the app's ``begin_shutdown``) before waiting for the
    running requests."""

    def __init__(self, config: uvicorn.Config, on_shutdown=None) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        if self.on_shutdown is not None:
            await self.on_shutdown()
        await super().shutdown(sockets)


def build_server(
    app, host: str = "127.0.0.1", port: int = 8000, *, limits: ServerLimits | None = None, log_level: str = "info"
) -> Server:
    """A Server for ``app`` (from ``create_app``) on ``host:port``, with ``limits`` (default ServerLimits())
    fitted to the process's descriptor limit."""
    limits, warning = (limits or ServerLimits()).fitted()
    if warning:
        logger.warning(warning)
    state = app.state.server
    grace = state.options.shutdown_grace + 5
    config = Config(app, limits=limits, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)
    rate_limit_logs()
    return Server(config, on_shutdown=state.begin_shutdown)
