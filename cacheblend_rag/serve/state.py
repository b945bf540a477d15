"""What the handlers share: the engine, its scheduler, metrics, options, access rules and quotas of one app
(``app.state.server``), and the small steps every handler takes (the model check, the caller, work off the
engine thread)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from starlette.requests import Request

from ..config import BlendConfig
from ..engine.batch_loop import BatchLoop
from ..engine.shared_registry import SharedChunkRegistry
from .access import ANONYMOUS, Access, Caller
from .errors import ApiError
from .metrics import ServerMetrics
from .options import ServerOptions
from .quota import ChunkQuota
from .scheduler import Scheduler

T = TypeVar("T")


class ServerState:
    """engine: the CacheBlendEngine served; options: ServerOptions (engine-dependent defaults resolved);
    access: Access; config: the BlendConfig of requests without ``cacheblend`` options."""

    def __init__(self, engine, options: ServerOptions, access: Access, config: BlendConfig | None = None) -> None:
        self.engine = engine
        self.options = options = options.resolved(engine.context_window, getattr(engine, "name", "cacheblend"))
        self.name: str = options.model_name
        self.access = access
        self.config = config or engine.default_config
        self.shared = engine.registry if isinstance(engine.registry, SharedChunkRegistry) else None
        on_idle = self.shared.sync if self.shared is not None else None
        batch = BatchLoop(
            engine, max_batch=options.max_active, kv_memory=options.kv_memory, prefill_budget=options.prefill_budget
        )
        self.scheduler = Scheduler(options.max_active, options.max_queue, on_idle=on_idle, batch=batch)
        self.metrics = ServerMetrics(engine, self.scheduler, self.shared.stats if self.shared is not None else None)
        self.quota = ChunkQuota(options.chunk_quota_texts, options.chunk_quota_tokens)
        self.started = int(time.time())
        self._pool: ThreadPoolExecutor | None = None
        self._draining: asyncio.Task | None = None

    def start(self) -> None:
        self.scheduler.start()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cacheblend-tokenize")

    async def stop(self) -> None:
        await self.begin_shutdown()
        if self._draining is not None:
            await self._draining
        await asyncio.to_thread(self.scheduler.close)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def begin_shutdown(self) -> None:
        """Start stopping (once): waiting requests get 503 now, running ones ``shutdown_grace`` seconds."""
        if self._draining is None:
            self._draining = asyncio.create_task(self.scheduler.drain(self.options.shutdown_grace))
            await asyncio.sleep(0)  # the waiting requests are failed before this returns

    async def off_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (tokenizing, formatting) on a small pool, off the event loop and the engine's thread."""
        if self._pool is None:
            raise RuntimeError("the server is not running")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {self.name!r} (GET /v1/models)",
                code="model_not_found",
                param="model",
            )


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def caller_of(request: Request) -> Caller:
    """The caller the authentication middleware resolved (anonymous where it did not run)."""
    return request.scope.get("cacheblend.caller", ANONYMOUS)
