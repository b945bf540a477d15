"""Async callers of the engine: its blocking, compute-bound iterators run in a worker thread.

``iterate_in_thread(make)`` runs ``iter(make())`` (e.g. a GenerationStream, or a generator over one) in a
worker thread and hands its items to the event loop through an ``asyncio.Queue``, so the loop keeps running
while the model computes. Both framework integrations use it, so they behave alike when the consumer goes
away (it closes the async iterator, or the task consuming it is cancelled): the worker stops after the item
it is on and closes the iterator (a GenerationStream stops decoding, frees its cache and counts the request as
abandoned), and the bridge waits for that, so no decoding outlives its consumer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

_ITEM, _ERROR, _DONE = "item", "error", "done"


async def iterate_in_thread(make: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """Run ``iter(make())`` in a worker thread and yield its items on the event loop (see the module)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    abandoned = threading.Event()

    def put(kind: str, value: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            abandoned.set()

    def produce() -> None:
        items = None
        try:
            items = iter(make())
            for item in items:
                if abandoned.is_set():
                    return
                put(_ITEM, item)
        except BaseException as exc:
            put(_ERROR, exc)
        else:
            put(_DONE, None)
        finally:
            close = getattr(items, "close", None)
            if abandoned.is_set() and close is not None:
                close()

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
        await worker  # returns once the worker is past its current item and has closed the iterator
