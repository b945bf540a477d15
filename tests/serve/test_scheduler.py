"""The scheduler on its own, with jobs the test controls: FIFO admission, decoding by turns, the queue bound,
cancellation while queued or running, failures, idle work, shutdown. No timing is asserted."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cacheblend_rag.serve.scheduler import QueueFull, Scheduler, SchedulerClosed


def pieces(name: str, n: int, log: list | None = None):
    try:
        for i in range(n):
            yield f"{name}{i}"
    finally:
        if log is not None:
            log.append(f"{name} closed")


def gated(gate: threading.Event, log: list):
    """Yields one piece, then waits for ``gate`` before each next one."""
    try:
        yield "first"
        while True:
            gate.wait(30)
            yield "more"
    finally:
        log.append("closed")


async def drain(ticket) -> list:
    events = []
    while True:
        kind, value = await ticket.next_event()
        events.append((kind, value))
        if kind in ("end", "error", "cancelled"):
            return events


def test_jobs_are_admitted_in_order():
    admitted: list[str] = []

    def job(name: str):
        admitted.append(name)
        return pieces(name, 3)

    async def main():
        scheduler = Scheduler(max_active=1, max_queue=4)
        tickets = [scheduler.submit(lambda n=n: job(n)) for n in "abc"]
        scheduler.start()
        results = await asyncio.gather(*(drain(t) for t in tickets))
        scheduler.close()
        return results

    a, b, c = asyncio.run(main())
    assert admitted == ["a", "b", "c"]
    assert [k for k, _ in a] == ["started", "piece", "piece", "piece", "end"]
    assert [v for k, v in b if k == "piece"] == ["b0", "b1", "b2"] and c[-1] == ("end", None)


def test_turns_interleave_running_jobs():
    seen: list[str] = []

    def recording(name):
        for piece in pieces(name, 3):
            seen.append(piece)
            yield piece

    async def main():
        scheduler = Scheduler(max_active=2, max_queue=0)
        first, second = scheduler.submit(lambda: recording("a")), scheduler.submit(lambda: recording("b"))
        scheduler.start()
        await asyncio.gather(drain(first), drain(second))
        scheduler.close()

    asyncio.run(main())
    assert seen == ["a0", "a1", "b0", "a2", "b1", "b2"]  # b is admitted after a's first turn, then they alternate


def test_a_full_queue_refuses_with_retry_after_and_cancelling_frees_a_place():
    gate, log = threading.Event(), []

    async def main():
        scheduler = Scheduler(max_active=1, max_queue=1).start()
        running = scheduler.submit(lambda: gated(gate, log))
        assert (await running.next_event())[0] == "started"
        assert await running.next_event() == ("piece", "first")  # the worker now waits inside its next turn
        queued = scheduler.submit(lambda: pieces("q", 1))
        with pytest.raises(QueueFull) as full:
            scheduler.submit(lambda: pieces("x", 1))
        assert full.value.retry_after >= 1 and full.value.waiting == 1 and "retry in" in str(full.value)
        queued.cancel()  # leaves the queue at once
        assert await drain(queued) == [("cancelled", None)] and scheduler.waiting == 0
        again = scheduler.submit(lambda: pieces("r", 2))
        running.cancel()  # its decoding stops at its next turn: the generator is closed
        gate.set()
        assert (await drain(running))[-1] == ("cancelled", None)
        assert [k for k, _ in await drain(again)] == ["started", "piece", "piece", "end"]
        scheduler.close()

    asyncio.run(main())
    assert log == ["closed"]


def test_failures_are_reported_and_the_worker_goes_on():
    def broken_start():
        raise ValueError("bad prompt")

    def broken_pieces():
        yield "ok"
        raise RuntimeError("decode failed")

    async def main():
        scheduler = Scheduler(max_active=1, max_queue=4)
        tickets = [
            scheduler.submit(broken_start),
            scheduler.submit(broken_pieces),
            scheduler.submit(lambda: {"answer": 42}),
        ]
        scheduler.start()
        results = [await drain(t) for t in tickets]
        scheduler.close()
        return results

    start_failed, decode_failed, plain = asyncio.run(main())
    assert start_failed[0][0] == "error" and str(start_failed[0][1]) == "bad prompt"
    assert decode_failed[:2] == [("started", decode_failed[0][1]), ("piece", "ok")]
    assert decode_failed[-1][0] == "error" and str(decode_failed[-1][1]) == "decode failed"
    assert plain == [("started", {"answer": 42}), ("end", None)]  # a job returning a value, not an iterator


def test_idle_work_and_shutdown():
    idle = threading.Event()
    gate, log = threading.Event(), []

    async def main():
        scheduler = Scheduler(max_active=1, max_queue=2, on_idle=idle.set, idle_every=0.01).start()
        await asyncio.to_thread(idle.wait, 30)
        running = scheduler.submit(lambda: gated(gate, log))
        assert (await running.next_event())[0] == "started"
        assert await running.next_event() == ("piece", "first")
        queued = scheduler.submit(lambda: pieces("q", 1))
        gate.set()  # the running job decodes on until the scheduler closes
        await asyncio.to_thread(scheduler.close)
        with pytest.raises(SchedulerClosed):
            scheduler.submit(lambda: pieces("late", 1))
        return await drain(running), await drain(queued)

    running, queued = asyncio.run(main())
    assert idle.is_set() and log == ["closed"]
    assert isinstance(running[-1][1], SchedulerClosed) and isinstance(queued[-1][1], SchedulerClosed)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_active"):
        Scheduler(max_active=0)
    with pytest.raises(ValueError, match="max_queue"):
        Scheduler(max_queue=-1)


def test_drain_fails_the_queue_at_once_and_running_jobs_after_the_grace():
    gate, finish, log = threading.Event(), threading.Event(), []

    def quick_job():  # decodes until told to finish
        while not finish.is_set():
            yield "tick"

    async def main():
        scheduler = Scheduler(max_active=2, max_queue=2).start()
        gate.set()  # the endless job decodes on and on
        quick = scheduler.submit(quick_job)
        endless = scheduler.submit(lambda: gated(gate, log))
        assert (await endless.next_event())[0] == "started" and await endless.next_event() == ("piece", "first")
        waiting = [scheduler.submit(lambda: pieces("w", 1)) for _ in range(2)]  # no free slot: they wait
        drained = asyncio.create_task(scheduler.drain(grace=0.5))
        early = [await drain(t) for t in waiting]  # failed at once, without a turn
        with pytest.raises(SchedulerClosed):
            scheduler.submit(lambda: pieces("late", 1))
        finish.set()  # the quick job ends within the grace period
        await drained
        finished = (await drain(quick))[-1]
        running = (await drain(endless))[-1]
        await asyncio.to_thread(scheduler.close)
        return early, finished, running

    early, finished, running = asyncio.run(main())
    assert all(len(e) == 1 and e[0][0] == "error" and isinstance(e[0][1], SchedulerClosed) for e in early)
    assert finished == ("end", None)  # finished within the grace period
    assert running[0] == "error" and "grace period" in str(running[1])
    assert log == ["closed"]  # the worker closed the job it was told to stop
