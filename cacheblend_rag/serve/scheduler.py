"""One engine, many HTTP requests: a bounded queue and one worker thread that runs all of the engine's work.

The engine is not batched: a prefill or a decode step computes one request. The worker admits one request
at a time from the queue and runs its prefill alone; it then decodes the admitted requests (at most
``max_active``) by turns, one text piece each, so a long answer does not hold a short one back and a new
request's prefill waits for at most one piece of each running request. Requests beyond ``max_active`` wait
in a FIFO of at most ``max_queue``; past that ``submit`` raises QueueFull and the server answers 429 with
Retry-After. A request whose client went away is cancelled: dropped from the queue, or its decoding stopped
at its next turn. The worker also runs ``on_idle`` when it has had nothing to do for ``idle_every`` seconds.

Stopping (``drain``): new jobs are refused and waiting ones fail at once with SchedulerClosed; running ones get
a grace period to finish, then fail with SchedulerClosed too (their events are posted from the event loop, so
they end on time even while the worker is inside a long step, which then stops at its next turn).

Nothing here knows about HTTP or the engine: a job is ``start()``, run on the worker thread, returning an
iterator (decoded piece by piece, by turns) or any other value (the job's result).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

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

    ``("started", value)`` once ``start()`` returned (value: what it returned), then ``("piece", x)`` per item
    of an iterator, then ``("end", None)``; or ``("error", exception)``; or ``("cancelled", None)``.
    """

    def __init__(self, scheduler: Scheduler, start: Callable[[], object], loop: asyncio.AbstractEventLoop) -> None:
        self.start = start
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
        """Stop the job: drop it from the queue, or stop its decoding at its next turn. No-op once done."""
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
        """End the job now with ``exc`` as its error event; the worker stops it at its next turn."""
        self._cancelled.set()
        self.post("error", exc)


class Scheduler:
    def __init__(
        self,
        max_active: int = 4,
        max_queue: int = 32,
        on_idle: Callable[[], None] | None = None,
        idle_every: float = 2.0,
    ) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_active, self.max_queue = max_active, max_queue
        self.on_idle, self.idle_every = on_idle, idle_every
        self._waiting: deque[Ticket] = deque()
        self._active: list[tuple[Ticket, Iterator]] = []
        self._starting: list[Ticket] = []  # admitted, start() running
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

    def submit(self, start: Callable[[], object]) -> Ticket:
        """Queue a job (raises QueueFull or SchedulerClosed). Call from a coroutine: events go to its loop."""
        ticket = Ticket(self, start, asyncio.get_running_loop())
        with self._cond:
            self._check_room()
            self._waiting.append(ticket)
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
        """Jobs admitted: starting (their prefill) or decoding by turns."""
        return len(self._active) + len(self._starting)

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
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify()
        for ticket in waiting:
            ticket.post("error", closed)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ticket in self.running():
            ticket.abort(SchedulerClosed("the server is shutting down and this request ran past its grace period"))

    def running(self) -> list[Ticket]:
        """The jobs admitted (starting or decoding) and not done."""
        with self._cond:
            return [t for t in (*self._starting, *(t for t, _ in self._active)) if not t.done]

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
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                ticket.post("cancelled")
            self._cond.notify()

    def _run(self) -> None:
        while True:
            admit = None
            with self._cond:
                while not self._stop and not self._waiting and not self._active:
                    if not self._cond.wait(timeout=self.idle_every) and self.on_idle is not None:
                        break
                if self._stop:
                    break
                if self._waiting and self.active < self.max_active:
                    admit = self._waiting.popleft()
                    self._starting.append(admit)
                idle = not admit and not self._active
            if idle:
                self._idle()
                continue
            if admit is not None:
                self._admit(admit)
            for job in list(self._active):
                self._step(job)
        self._shutdown()

    def _idle(self) -> None:
        try:
            self.on_idle()  # type: ignore[misc]
        except Exception:
            logger.exception("the scheduler's idle task failed")

    def _admit(self, ticket: Ticket) -> None:
        ticket.started_at = time.monotonic()
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
            waiting, self._waiting = list(self._waiting), deque()
            active, self._active = list(self._active), []
        for ticket in waiting:
            ticket.post("error", SchedulerClosed("the server is shutting down"))
        for ticket, pieces in active:
            self._close(pieces)
            ticket.post("error", SchedulerClosed("the server is shutting down"))
