"""One engine request as LangChain needs it: per-call options, timeout, retries, and a thread bridge for async.

The engine is synchronous and compute-bound. Async callers get its text pieces through a worker thread and an
``asyncio.Queue``, so the event loop keeps running while the model computes. A consumer that stops early
(a closed or cancelled stream) tells the worker to stop after the token it is on, and waits for that.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine, GenerationResult, GenerationStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """Everything one request needs besides its prompt (instance defaults merged with per-call overrides)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] | None
    config: BlendConfig
    timeout: float | None
    max_retries: int


class Generation:
    """Iterate for the text pieces of one request; ``result`` holds the engine's GenerationResult afterwards.

    ``timeout`` bounds the whole request: it is checked after the prefill and after every piece, and raises
    TimeoutError (the prefill itself cannot be interrupted). ``max_retries`` retries a prefill that ran out of
    accelerator memory (``torch.OutOfMemoryError``: concurrent requests can hold memory for a moment); other
    errors are bad input or bugs and are raised at once.
    """

    def __init__(self, engine: CacheBlendEngine, prompt: str, options: Options) -> None:
        self.engine = engine
        self.prompt = prompt
        self.options = options
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        started = time.monotonic()
        stream = self._start()
        self._check_deadline(started, 0)
        for n, piece in enumerate(stream, start=1):
            yield piece
            self._check_deadline(started, n)
        self.result = stream.result

    def run(self) -> GenerationResult:
        """Generate to the end and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _start(self) -> GenerationStream:
        opts = self.options
        for attempt in range(opts.max_retries + 1):
            try:
                return self.engine.stream(
                    prompt=self.prompt,
                    max_new_tokens=opts.max_new_tokens,
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                    seed=opts.seed,
                    stop=opts.stop,
                    config=opts.config,
                )
            except torch.OutOfMemoryError:
                if attempt == opts.max_retries:
                    raise
                logger.warning("out of memory in the prefill; retry %d of %d", attempt + 1, opts.max_retries)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        raise AssertionError("unreachable")

    def _check_deadline(self, started: float, pieces: int) -> None:
        timeout = self.options.timeout
        if timeout is not None and time.monotonic() - started > timeout:
            raise TimeoutError(
                f"generation exceeded timeout={timeout}s after {pieces} text piece(s); "
                "raise timeout, lower max_tokens, or pass timeout=None for no limit"
            )


_ITEM, _ERROR, _DONE = "item", "error", "done"


async def iterate_in_thread(make: Callable[[], Iterable[str]]) -> AsyncIterator[str]:
    """Run ``iter(make())`` in a worker thread and yield its items on the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    abandoned = threading.Event()

    def put(kind: str, value: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            abandoned.set()

    def produce() -> None:
        try:
            for item in make():
                if abandoned.is_set():
                    return
                put(_ITEM, item)
        except BaseException as exc:
            put(_ERROR, exc)
        else:
            put(_DONE, None)

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == _ITEM:
                yield value  # type: ignore[misc]
            elif kind == _ERROR:
                raise value  # type: ignore[misc]
            else:
                break
    finally:
        abandoned.set()
        await worker  # returns once the worker is past its current token: no request outlives its consumer
