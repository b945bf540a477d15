"""Requests decoded together by the server answer what each gets alone from ``engine.generate`` (a tiny fp32 model):
the same text, finish reason and usage, streamed or not, prompts of several lengths, with registered chunks reused
or not, while one streamed request in the same batch is cancelled by its client. The test holds the worker (a
/v1/chunks job waiting for its permit) until every request is queued, then gives the batch its decoding steps one
at a time (PacedEngine), so the requests share the batch whatever the machine's speed."""

from __future__ import annotations

import json
import threading

import httpx

from cacheblend_rag import BlendConfig
from tests.conftest import PASSAGES

from .conftest import PacedEngine, chat, serving, sse_events, tiny_engine, wait_until

QUESTION = "\nWhich of these is the longest?"


def cases() -> list[tuple[dict, bool]]:
    """(body, streamed): prompts of a few to ~90 tokens, some holding the registered passages."""
    return [
        (chat("Hi", max_tokens=9), False),
        (chat(PASSAGES[0] + PASSAGES[1] + QUESTION, max_tokens=24), True),
        (chat("Tell me about rivers and mountains.", max_tokens=16), True),
        (chat(PASSAGES[2] + QUESTION, max_tokens=20, cacheblend={"strategy": "full_reuse"}), False),
        (chat(PASSAGES[1] + " and then " + PASSAGES[0], max_tokens=12), False),
    ]


def alone(engine, body: dict):
    config = BlendConfig(**body.get("cacheblend", {}))
    return engine.generate(messages=body["messages"], config=config, max_new_tokens=body["max_tokens"])


def ask(url: str, body: dict, streamed: bool, out: dict, key) -> None:
    if not streamed:
        out[key] = httpx.post(url, json=body, timeout=120).json()
        return
    streamed_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=streamed_body, timeout=120) as r:
        out[key] = sse_events(r)


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e != "[DONE]" and e["choices"])


def test_a_batch_of_requests_answers_what_each_gets_alone_while_one_is_cancelled(tokenizer, tmp_path):
    engine = tiny_engine(tokenizer, tmp_path, cls=PacedEngine)
    engine.paced = False
    engine.precompute(PASSAGES)
    for body, _ in cases():  # each prompt's head is stored by its first request: the batch's requests read it
        alone(engine, body)
    expected = [alone(engine, body) for body, _ in cases()]
    cancelled_alone = engine.generate(messages=chat("Go on and on.")["messages"], max_new_tokens=200)
    engine.paced = True
    sizes: list[int] = []
    with serving(engine, max_active=8, max_queue=8, prefill_budget=1 << 20) as live:  # a prefill: one step
        batch = live.app.state.server.scheduler.batch
        batch.before_decode = lambda: (sizes.append(len(batch.pool)), engine.wait_permit())
        url = f"{live.url}/v1/chat/completions"
        chunks = {"json": {"texts": ["x"]}, "timeout": 120}
        hold = threading.Thread(target=httpx.post, args=(f"{live.url}/v1/chunks",), kwargs=chunks)
        hold.start()  # its job waits in attach for a permit: nothing else runs meanwhile
        wait_until(lambda: live.app.state.server.scheduler.active == 1, "the chunk job to hold the worker")
        out: dict = {}
        clients = [threading.Thread(target=ask, args=(url, b, s, out, i)) for i, (b, s) in enumerate(cases())]
        seen, left = [], threading.Event()

        def leaves() -> None:
            body = {**chat("Go on and on.", max_tokens=200), "stream": True}
            with httpx.stream("POST", url, json=body, timeout=120) as response:
                for event in sse_events_until(response, 3):
                    seen.append(event)
            left.set()  # the connection is closed: the server cancels the request

        clients.append(threading.Thread(target=leaves))
        for client in clients:
            client.start()
        wait_until(lambda: live.app.state.server.scheduler.waiting == len(clients), "every request to queue")
        engine.step()  # the chunk job ends; the requests are admitted one per step, decoding a step at a time
        before = engine.metrics()["abandoned_requests"]
        for _ in range(2000):
            if len(out) == len(cases()) and engine.metrics()["abandoned_requests"] > before:
                break
            if len(seen) >= 3:
                left.wait(60)
            taken = engine.taken
            engine.step()
            wait_until(lambda t=taken: engine.taken > t or len(out) == len(cases()), "a decoding step")
        engine.unpace()
        for client in [hold, *clients]:
            client.join(120)
    assert max(sizes) >= 4  # the requests shared the batch
    assert engine.metrics()["abandoned_requests"] == before + 1
    got = streamed_text(seen)
    assert got and cancelled_alone.text.startswith(got)
    for i, ((_, streamed), want) in enumerate(zip(cases(), expected, strict=True)):
        if streamed:
            events = out[i]
            usage = events[-2]["usage"]
            assert events[-1] == "[DONE]" and streamed_text(events) == want.text
            finish = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"]][-1]
        else:
            usage, choice = out[i]["usage"], out[i]["choices"][0]
            assert choice["message"]["content"] == want.text
            finish = choice["finish_reason"]
        assert finish == ("length" if want.finish_reason == "length" else "stop")
        assert usage["completion_tokens"] == want.stats.new_tokens
        assert usage["prompt_tokens"] == want.stats.prompt_tokens
        assert usage["prompt_tokens_details"]["cached_tokens"] == want.stats.reused_tokens
    assert sum(want.stats.reused_tokens > 0 for want in expected) >= 2  # chunks were reused in the batch too


def sse_events_until(response: httpx.Response, pieces: int) -> list:
    """The first events of a stream, up to its ``pieces``-th content piece (then the caller closes it)."""
    events = []
    for event in iter_events(response):
        events.append(event)
        if len([e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]) >= pieces:
            break
    return events


def iter_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def test_a_request_whose_kv_cannot_fit_the_budget_is_refused_with_the_option_named(tokenizer, tmp_path):
    from cacheblend_rag.engine.decode_pool import MIN_CAPACITY
    from cacheblend_rag.engine.kv_slots import KVSlots

    engine = tiny_engine(tokenizer, tmp_path)
    budget = 3 * MIN_CAPACITY * KVSlots.slot_bytes(engine.model_forward, 1)  # two slots of 256 rows and the scratch one
    with serving(engine, kv_memory=budget) as live:
        url = f"{live.url}/v1/chat/completions"
        fits = httpx.post(url, json=chat("Hi", max_tokens=100), timeout=120)
        refused = httpx.post(url, json=chat("Hi", max_tokens=256), timeout=120)  # > 256 rows: needs 2 x 512
    assert fits.status_code == 200
    assert refused.status_code == 400 and "kv_memory" in refused.json()["error"]["message"]
