"""One engine, many HTTP requests: a bounded queue and one worker thread that runs all of the engine's work.

Generation requests are batched (``cacheblend_rag.engine.batch_loop``): each iteration of the worker runs a budget
of the admitted request's prefill (``prefill_budget`` rows x layers) and then one decoding step for every running
sequence at once, posting each sequence's text piece to its ticket; a request leaves the batch when it ends. So a
new request's prefill never holds the running streams for longer than one budget between two of their tokens.
A request is admitted when its KV (prompt and max_tokens) fits the batch's memory budget beside the running ones;
one prefill runs at a time, and a short prompt may overtake a long one every other step (batch_loop.py). Waiting
requests are queued per caller and admitted round robin between callers, first in first out for each
(``fair_queue.py``), at most ``max_queue`` of them: past that ``submit`` raises QueueFull and the server answers
429 with Retry-After. Other jobs (``start()`` returning an iterator or a value, as ``POST /v1/chunks``' steps) run
on the same worker by turns, one item per iteration, at most ``max_active`` at once.

A request whose client went away is cancelled: dropped from the queue, or stopped at the batch's next step (its
slot freed). The worker also runs ``on_idle`` when it has had nothing to do for ``idle_every`` seconds.

Stopping (``drain``): new jobs are refused and waiting ones fail at once with SchedulerClosed; running ones get
a grace period to finish, then fail with SchedulerClosed too (their events are posted from the event loop, so
they end on time even while the worker is inside a long step, which then drops them at its next one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator

from ..engine.batch_loop import BatchLoop, StepEvents
from ..engine.batch_request import BatchRequest
from .fair_queue import FairQueue

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue is full: ``running`` jobs admitted or about to be (at most ``max_active``), ``waiting`` beyond
    them (``max_queue``); ``retry_after``: seconds after which a retry is likely to be admitted."""

    def __init__(self, running: int, waiting: int, max_active: int, max_queue: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {running} running (max_active {max_active}), {waiting} waiting (max_queue "
            f"{max_queue}); retry in {retry_after}s"
        )
        self.running, self.waiting, self.retry_after = running, waiting, retry_after
        self.max_active, self.max_queue = max_active, max_queue


class SchedulerClosed(Exception):
    """The server is shutting down."""


class Ticket:
    """One job seen from the event loop. ``await next_event()`` returns (kind, value):

    ``("started", value)`` once the job started (a BatchRequest: once its prefill ended, value: the request; else
    once ``start()`` returned, value: what it returned), then ``("piece", x)`` per text piece or item of an
    iterator, then ``("end", None)``; or ``("error", exception)``; or ``("cancelled", None)``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        job: Callable[[], object] | BatchRequest,
        loop: asyncio.AbstractEventLoop,
        caller: Hashable = None,
    ) -> None:
        self.request = job if isinstance(job, BatchRequest) else None
        self.start = None if self.request is not None else job
        self.caller = caller
        self.submitted = time.monotonic()
        self.started_at: float | None = None
        self.first_piece_at: float | None = None
        self._scheduler = scheduler
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the job: drop it from the queue, or stop it at its next step or turn. No-op once done."""
        if not self.done and not self._cancelled.is_set():
            self._cancelled.set()
            self._scheduler._cancelled(self)

    async def next_event(self) -> tuple[str, object]:
        return await self._events.get()

    def post(self, kind: str, value: object = None) -> None:
        """Hand one event to the event loop (from any thread); nothing after the job's last event."""
        with self._lock:
            if self.done:
                return
            if kind == "piece" and self.first_piece_at is None:
                self.first_piece_at = time.monotonic()
            if kind in ("end", "error", "cancelled"):
                self.done = True
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    def abort(self, exc: BaseException) -> None:
        """End the job now with ``exc`` as its error event; the worker stops it at its next step or turn."""
        self._cancelled.set()
        if self.request is not None:
            self.request.stop()
        self.post("error", exc)


class Scheduler:
    """The worker and its queue. max_active: generation requests decoding together (the batch's ``max_batch``,
    with ``batch``), and other jobs run by turns at once; max_queue: jobs that may wait. batch: the BatchLoop that
    generation requests (BatchRequest jobs) run in; without one only other jobs are taken."""

    def __init__(
        self,
        max_active: int = 4,
        max_queue: int = 32,
        on_idle: Callable[[], None] | None = None,
        idle_every: float = 2.0,
        batch: BatchLoop | None = None,
    ) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_active, self.max_queue = max_active, max_queue
        self.on_idle, self.idle_every = on_idle, idle_every
        self.batch = batch
        self._waiting: FairQueue[Ticket] = FairQueue()
        self._active: list[tuple[Ticket, Iterator]] = []  # other jobs, stepped by turns
        self._starting: list[Ticket] = []  # admitted, start() running
        self._batched: dict[int, Ticket] = {}  # id(request) -> ticket: admitted to the batch, not ended
        self._cond = threading.Condition()
        self._closed = False  # new jobs are refused
        self._stop = False  # the worker exits
        self._service_s = 1.0  # moving average of a job's time from admission to its end
        self._thread: threading.Thread | None = None

    # ---- called from the event loop -----------------------------------------------------------------
    def start(self) -> Scheduler:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cacheblend-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, job: Callable[[], object] | BatchRequest, caller: Hashable = None) -> Ticket:
        """Queue a job (raises QueueFull or SchedulerClosed): a BatchRequest (run in the batch) or a ``start``
        callable; ``caller`` names whose turn it takes in the queue. Call from a coroutine: events go to its loop."""
        if isinstance(job, BatchRequest):
            if self.batch is None:
                raise RuntimeError("this scheduler has no batch: give it a BatchLoop to run generation requests")
            self.batch.check(job)  # ValueError if its KV could never fit the budget
        ticket = Ticket(self, job, asyncio.get_running_loop(), caller)
        with self._cond:
            self._check_room()
            self._waiting.push(ticket, caller)
            self._cond.notify()
        return ticket

    def check_room(self) -> None:
        """Raise QueueFull or SchedulerClosed if a job submitted now would be refused (a hint: nothing is held)."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._closed:
            raise SchedulerClosed("the server is shutting down; retry on another replica")
        free = max(0, self.max_active - self.active)  # jobs that will be admitted at once do not queue
        about_to_start = min(free, len(self._waiting))
        queued = len(self._waiting) - about_to_start
        if queued + 1 > self.max_queue and about_to_start == free:
            raise QueueFull(self.active + about_to_start, queued, self.max_active, self.max_queue, self.retry_after())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Jobs admitted: requests prefilling or decoding in the batch, other jobs starting or stepped by turns."""
        return len(self._active) + len(self._starting) + len(self._batched)

    def retry_after(self) -> int:
        """Seconds until a request sent now is likely to find room in the queue (1 to 60)."""
        per_slot = self._service_s / self.max_active
        return max(1, min(60, math.ceil(per_slot * (len(self._waiting) + 1))))

    async def drain(self, grace: float) -> None:
        """Refuse new jobs and fail the waiting ones now; give the running ones ``grace`` seconds to finish,
        then fail them. Returns once no job is running (or right after failing them)."""
        closed = SchedulerClosed("the server is shutting down; retry on another replica")
        with self._cond:
            self._closed = True
            waiting = self._waiting.clear()
            self._cond.notify()
        for ticket in waiting:
            ticket.post("error", closed)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ticket in self.running():
            ticket.abort(SchedulerClosed("the server is shutting down and this request ran past its grace period"))
        with self._cond:
            self._cond.notify()

    def running(self) -> list[Ticket]:
        """The jobs admitted (in the batch, starting or stepped by turns) and not done."""
        with self._cond:
            tickets = [*self._batched.values(), *self._starting, *(t for t, _ in self._active)]
        return [t for t in tickets if not t.done]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: waiting jobs get SchedulerClosed, running ones are closed."""
        with self._cond:
            self._closed = self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker thread --------------------------------------------------------------------------
    def _cancelled(self, ticket: Ticket) -> None:
        with self._cond:
            if self._waiting.remove(ticket):
                ticket.post("cancelled")
            elif ticket.request is not None:
                ticket.request.stop()  # the batch drops it at its next step
            self._cond.notify()

    def _busy(self) -> bool:
        return bool(self._active or self._starting or self._batched)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._busy() and not self._admissible():
                    if not self._cond.wait(timeout=self.idle_every) and self.on_idle is not None:
                        break
                if self._stop:
                    break
                admit = self._waiting.pop() if self._admissible() else None
                if admit is not None:
                    if admit.request is not None:
                        self._batched[id(admit.request)] = admit
                    else:
                        self._starting.append(admit)
                idle = admit is None and not self._busy()
            if idle:
                self._idle()
                continue
            if admit is not None:
                self._admit(admit)
            self._turn()
        self._shutdown()

    def _admissible(self) -> bool:
        """Whether the job whose turn it is in the queue may be admitted now (under the lock)."""
        ticket = self._waiting.peek()
        if ticket is None:
            return False
        if ticket.request is None:
            return self.active < self.max_active
        return self.batch is not None and self.batch.admissible(ticket.request)

    def _idle(self) -> None:
        if self.on_idle is None:
            return
        try:
            self.on_idle()
        except Exception:
            logger.exception("the scheduler's idle task failed")

    def _admit(self, ticket: Ticket) -> None:
        ticket.started_at = time.monotonic()
        if ticket.request is not None:
            assert self.batch is not None
            self.batch.admit(ticket.request)  # its prefill runs in the next steps; "started" once it has
            return
        assert ticket.start is not None
        try:
            value = ticket.start()
        except Exception as exc:
            with self._cond:
                self._starting.remove(ticket)
            self._finish(ticket, "error", exc)
            return
        with self._cond:  # counted as active before the event loop hears of it
            self._starting.remove(ticket)
            if isinstance(value, Iterator):
                self._active.append((ticket, value))
        ticket.post("started", value)
        if not isinstance(value, Iterator):
            self._finish(ticket, "end")

    def _turn(self) -> None:
        """One step of the batch (a budget of prefill, one token for every sequence), one turn of each other job."""
        if self.batch is not None and self.batch.busy:
            # "started" once a prefill ended, the pieces as soon as they are picked, before the forward
            for step in (self.batch.prefill_step, self.batch.decode_step, self.batch.forward_step):
                try:
                    events = step()
                except Exception as exc:  # a bug: the worker goes on, the requests in the batch fail
                    logger.exception("the batch's step failed")
                    events = StepEvents(failed=[(r, exc) for r in self.batch.stop_all()])
                self._post(events)
        for job in list(self._active):
            self._step(job)

    def _post(self, events: StepEvents) -> None:
        for request in events.joined:
            self._batched[id(request)].post("started", request)
        for request, piece in events.pieces:
            self._batched[id(request)].post("piece", piece)
        for request in events.ended:
            self._end_batched(request, "end")
        for request in events.stopped:
            self._end_batched(request, "cancelled")  # an aborted one has had its error event already
        for request, exc in events.failed:
            self._end_batched(request, "error", exc)

    def _end_batched(self, request: BatchRequest, kind: str, value: object = None) -> None:
        with self._cond:
            ticket = self._batched.pop(id(request))
        self._finish(ticket, kind, value)

    def _step(self, job: tuple[Ticket, Iterator]) -> None:
        ticket, pieces = job
        if ticket.cancelled:
            self._drop(job)
            self._close(pieces)
            self._finish(ticket, "cancelled")
            return
        try:
            piece = next(pieces)
        except StopIteration:
            self._drop(job)
            self._finish(ticket, "end")
        except Exception as exc:
            self._drop(job)
            self._close(pieces)
            self._finish(ticket, "error", exc)
        else:
            ticket.post("piece", piece)

    def _drop(self, job) -> None:
        with self._cond:
            self._active.remove(job)

    def _finish(self, ticket: Ticket, kind: str, value: object = None) -> None:
        if ticket.started_at is not None:
            spent = time.monotonic() - ticket.started_at
            self._service_s = 0.8 * self._service_s + 0.2 * spent
        ticket.post(kind, value)

    @staticmethod
    def _close(pieces: Iterator) -> None:
        close = getattr(pieces, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                logger.exception("closing a cancelled generation failed")

    def _shutdown(self) -> None:
        with self._cond:
            waiting = self._waiting.clear()
            active, self._active = list(self._active), []
            batched, self._batched = list(self._batched.values()), {}
        if self.batch is not None:
            self.batch.stop_all()
        for ticket in waiting:
            ticket.post("error", SchedulerClosed("the server is shutting down"))
        for ticket, pieces in active:
            self._close(pieces)
            ticket.post("error", SchedulerClosed("the server is shutting down"))
        for ticket in batched:
            ticket.post("error", SchedulerClosed("the server is shutting down"))
