"""The scheduler over a real engine's batch (a tiny fp32 model), its events on the event loop: admission by KV
memory, callers served in turn, a long prefill interleaved with the running streams' decoding, and drain / close
with a running batch. The worker is held (``before_decode`` waits on a gate the test opens) where a test needs a
state to last; every assertion is on the order of events and on counts, never on time."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cacheblend_rag.engine.batch_loop import BatchLoop
from cacheblend_rag.engine.batch_request import BatchRequest
from cacheblend_rag.engine.decode_pool import MIN_CAPACITY
from cacheblend_rag.engine.kv_slots import KVSlots
from cacheblend_rag.serve.fair_queue import FairQueue
from cacheblend_rag.serve.scheduler import Scheduler, SchedulerClosed

from .conftest import tiny_engine


@pytest.fixture
def engine(tokenizer, tmp_path):
    return tiny_engine(tokenizer, tmp_path)


async def drain(ticket) -> list:
    events = []
    while True:
        kind, value = await ticket.next_event()
        events.append((kind, value))
        if kind in ("end", "error", "cancelled"):
            return events


LONG_PROMPT = "A very long story about the sea and ships. " * 10


def text_of(events: list) -> str:
    return "".join(v for k, v in events if k == "piece")


def test_the_fair_queue_serves_callers_in_turn_first_in_first_out_for_each():
    queue: FairQueue[str] = FairQueue()
    for item, caller in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        queue.push(item, caller)
    assert queue.peek() == "a1" and len(queue) == 6
    assert queue.remove("c1") and not queue.remove("c1")
    assert [queue.pop() for _ in range(3)] == ["a1", "b1", "a2"]
    queue.push("c2", "c")
    assert queue.clear() == ["b2", "a3", "c2"] and len(queue) == 0 and queue.peek() is None


def test_requests_wait_for_kv_memory_and_run_once_it_frees(engine):
    row = KVSlots.slot_bytes(engine.model_forward, 1)
    gate, sizes = threading.Semaphore(0), []
    batch = BatchLoop(engine, max_batch=8, kv_memory=3 * MIN_CAPACITY * row)  # two slots of MIN_CAPACITY rows

    def held():
        sizes.append(len(batch.pool))
        gate.acquire(timeout=60)

    batch.before_decode = held
    engine.eos_token_ids = frozenset()  # every request runs to its max_new_tokens
    prompts = ["First question?", "Second question?", "Third question?"]
    expected = [engine.generate(prompt=p, max_new_tokens=12).text for p in prompts]

    async def main():
        scheduler = Scheduler(max_active=8, max_queue=4, batch=batch).start()
        tickets = [scheduler.submit(BatchRequest(engine, prompt=p, max_new_tokens=12)) for p in prompts]
        while scheduler.active < 2:
            gate.release()  # let the worker step until two requests are in
            await asyncio.sleep(0.01)
        assert scheduler.waiting == 1 and scheduler.active == 2  # no room for the third one's KV
        for _ in range(200):
            gate.release()
        results = [await drain(t) for t in tickets]
        scheduler.close()
        return results

    results = asyncio.run(main())
    assert [text_of(r) for r in results] == expected
    assert max(sizes) == 2


def test_callers_take_turns_in_the_queue(engine):
    order: list[str] = []
    batch = BatchLoop(engine, max_batch=1)  # one at a time: admission order is the order they run in
    batch.before_decode = lambda: order.append(batch.pool.requests[0].name)

    def request(name: str) -> BatchRequest:
        made = BatchRequest(engine, prompt=f"Say {name}.", max_new_tokens=1)
        made.name = name
        return made

    async def main():
        scheduler = Scheduler(max_active=1, max_queue=8, batch=batch)  # started once all are queued
        tickets = [scheduler.submit(request(n), caller=n[0]) for n in ("a1", "a2", "a3", "b1", "b2", "c1")]
        scheduler.start()
        await asyncio.gather(*(drain(t) for t in tickets))
        scheduler.close()

    asyncio.run(main())
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_a_running_stream_decodes_between_the_prefill_steps_of_a_long_prompt(engine):
    engine.eos_token_ids = frozenset()  # the running stream runs to its max_new_tokens
    batch = BatchLoop(engine, max_batch=4, prefill_budget=8 * engine.model_forward.n_layers)
    running = BatchRequest(engine, prompt="Keep talking", max_new_tokens=80)
    long = BatchRequest(engine, prompt=LONG_PROMPT, max_new_tokens=3)
    want = [
        engine.generate(prompt="Keep talking", max_new_tokens=80),
        engine.generate(prompt=LONG_PROMPT, max_new_tokens=3),
    ]
    log: list[int] = []  # at each decoding step: the long prompt's prefill work so far (-1 once it decodes)
    batch.before_decode = lambda: log.append(long.prefill_work if long.seq is None else -1)

    async def main():
        scheduler = Scheduler(max_active=4, max_queue=4, batch=batch).start()
        first = scheduler.submit(running)
        assert (await first.next_event())[0] == "started"
        second = scheduler.submit(long)
        results = await asyncio.gather(drain(first), drain(second))
        scheduler.close()
        return results

    first, second = asyncio.run(main())
    during = [work for work in log if work > 0]  # decoding steps while the long prompt was half prefilled
    assert long.work > 4 * batch.prefill_budget
    assert len(during) >= 4 and during == sorted(set(during))  # one prefill step between two decoding steps
    assert log.index(during[0]) < log.index(-1)  # ... before the long prompt joined the batch
    assert text_of(first) == want[0].text and text_of(second) == want[1].text


def test_drain_fails_the_queue_and_then_the_running_batch_and_close_ends_everything(engine):
    gate = threading.Event()
    batch = BatchLoop(engine, max_batch=2)
    batch.before_decode = lambda: gate.wait(0.02)  # decoding crawls along until the test opens the gate
    engine.eos_token_ids = frozenset()  # no request ends before its max_new_tokens

    async def main():
        scheduler = Scheduler(max_active=2, max_queue=4, batch=batch).start()
        quick = scheduler.submit(BatchRequest(engine, prompt="Short", max_new_tokens=4))
        endless = scheduler.submit(BatchRequest(engine, prompt="Long", max_new_tokens=5000))
        for ticket in (quick, endless):
            assert (await ticket.next_event())[0] == "started"
        waiting = [scheduler.submit(BatchRequest(engine, prompt="Wait", max_new_tokens=2)) for _ in range(2)]
        assert scheduler.waiting == 2
        drained = asyncio.create_task(scheduler.drain(grace=1.0))
        early = [await drain(t) for t in waiting]
        with pytest.raises(SchedulerClosed):
            scheduler.submit(BatchRequest(engine, prompt="Late", max_new_tokens=2))
        await drained
        results = await drain(quick), await drain(endless)
        await asyncio.to_thread(scheduler.close)
        return early, results

    before = engine.metrics()["abandoned_requests"]
    early, (quick, endless) = asyncio.run(main())
    assert all(len(e) == 1 and isinstance(e[0][1], SchedulerClosed) for e in early)
    assert quick[-1] == ("end", None)
    assert endless[-1][0] == "error" and "grace period" in str(endless[-1][1])
    assert engine.metrics()["abandoned_requests"] == before + 1
    assert not batch.busy


def test_close_with_a_running_batch_ends_its_streams_with_an_error(engine):
    batch = BatchLoop(engine, max_batch=2)
    gate = threading.Event()
    batch.before_decode = lambda: gate.wait(0.02)
    engine.eos_token_ids = frozenset()

    async def main():
        scheduler = Scheduler(max_active=2, max_queue=4, batch=batch).start()
        running = scheduler.submit(BatchRequest(engine, prompt="Go", max_new_tokens=5000))
        assert (await running.next_event())[0] == "started"
        await asyncio.to_thread(scheduler.close)
        return await drain(running)

    events = asyncio.run(main())
    assert isinstance(events[-1][1], SchedulerClosed) and not batch.busy


def test_the_kv_memory_and_prefill_budget_options_are_checked():
    from cacheblend_rag.cli.serve import kv_memory_option
    from cacheblend_rag.serve.options import ServerOptions

    assert kv_memory_option("0.2") == 0.2 and kv_memory_option("2GB") == 2 * 10**9
    assert kv_memory_option("1e9") == 10**9 and kv_memory_option("512MiB") == 512 << 20
    assert kv_memory_option(None) is None
    for bad in ("1.5", "lots"):
        with pytest.raises(ValueError):
            kv_memory_option(bad)
    with pytest.raises(ValueError, match="kv_memory"):
        ServerOptions(kv_memory=1.5)
    with pytest.raises(ValueError, match="prefill_budget"):
        ServerOptions(prefill_budget=0)
    assert ServerOptions(kv_memory=0.5, prefill_budget=64).kv_memory == 0.5
