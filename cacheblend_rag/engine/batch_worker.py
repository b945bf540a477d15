"""Concurrent callers in one process decoding together: a worker thread that runs one BatchLoop for an engine.

``batch_worker(engine)`` is the engine's shared worker (made on first use). ``submit(request)`` (a BatchRequest,
from any thread) queues the request and returns a ``BatchHandle``: iterate it for the request's text pieces (it
blocks until each is made), then read ``result``; ``close()`` stops the request at the batch's next step (leaving
the iteration early closes it too). Requests are admitted first in, first out as the batch's KV budget allows
(engine/batch_loop.py), and decode together, so callers that ask at once (a framework's async fan-out, a thread
pool) share each decoding step instead of taking turns. The thread runs while there is work and ends when there is
none; the next request starts it again.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterator

from .batch_loop import BatchLoop, StepEvents
from .batch_request import BatchRequest
from .generation import GenerationResult

_END, _PIECE, _ERROR, _STOPPED = "end", "piece", "error", "stopped"


class BatchHandle:
    """One request submitted to a BatchWorker: an iterator of its text pieces; ``result`` once it ended."""

    def __init__(self, request: BatchRequest) -> None:
        self.request = request
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._done = False

    def __iter__(self) -> Iterator[str]:
        try:
            while not self._done:
                kind, value = self._events.get()
                if kind == _PIECE:
                    yield value  # type: ignore[misc]
                    continue
                self._done = True
                if kind == _ERROR:
                    raise value  # type: ignore[misc]
                if kind == _STOPPED:
                    raise RuntimeError("the request was stopped before its end")
        finally:
            if not self._done:
                self.close()  # the consumer left early

    @property
    def result(self) -> GenerationResult:
        """The request's result (waits for its end)."""
        for _ in self:
            pass
        return self.request.result

    def close(self) -> None:
        """Stop the request at the batch's next step (a no-op once it ended)."""
        self.request.stop()

    def post(self, kind: str, value: object = None) -> None:
        self._events.put((kind, value))


class BatchWorker:
    """A thread decoding the submitted requests of ``engine`` together (BatchLoop's max_batch, kv_memory,
    prefill_budget)."""

    def __init__(self, engine, **loop_options) -> None:
        self.loop = BatchLoop(engine, **loop_options)
        self._inbox: deque[BatchHandle] = deque()
        self._handles: dict[int, BatchHandle] = {}  # id(request) -> its handle, once admitted
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Requests submitted and not admitted yet."""
        return len(self._inbox)

    def submit(self, request: BatchRequest) -> BatchHandle:
        """Queue ``request`` (ValueError if its KV could never fit the budget); returns its handle."""
        self.loop.check(request)
        handle = BatchHandle(request)
        with self._lock:
            self._inbox.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cacheblend-batch", daemon=True)
                self._thread.start()
        return handle

    def _run(self) -> None:
        loop = self.loop
        while True:
            with self._lock:
                if self._inbox and loop.admissible(self._inbox[0].request):
                    handle = self._inbox.popleft()
                    self._handles[id(handle.request)] = handle
                    loop.admit(handle.request)
                if not self._inbox and not loop.busy:
                    self._thread = None  # a submit from now on starts a new thread
                    return
            for step in (loop.prefill_step, loop.decode_step, loop.forward_step):  # pieces before the forward
                try:
                    events = step()
                except Exception as exc:  # a bug: the requests in the batch fail, the worker goes on
                    events = StepEvents(failed=[(r, exc) for r in loop.stop_all()])
                self._post(events)

    def _post(self, events: StepEvents) -> None:
        handles = self._handles
        for request, piece in events.pieces:
            handles[id(request)].post(_PIECE, piece)
        for request in events.ended:
            handles.pop(id(request)).post(_END)
        for request in events.stopped:
            handles.pop(id(request)).post(_STOPPED)
        for request, exc in events.failed:
            handles.pop(id(request)).post(_ERROR, exc)


_workers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_workers_lock = threading.Lock()


def batch_worker(engine) -> BatchWorker:
    """The shared BatchWorker of ``engine`` (default BatchLoop options), made on first use."""
    with _workers_lock:
        worker = _workers.get(engine)
        if worker is None:
            worker = _workers[engine] = BatchWorker(engine)
        return worker
