"""Honest concurrency over real HTTP: a bounded queue, 429 with Retry-After past it, a client that disconnects
stops its decoding (streamed or not), and the server goes on. The engine is paced by the test (PacedEngine):
a request stays running exactly as long as the test says, so nothing here depends on speed."""

from __future__ import annotations

import threading

import httpx
import pytest

from .conftest import PacedEngine, chat, metric, serving, tiny_engine, wait_until

LONG = 1500  # more tokens than any request here is allowed to decode


@pytest.fixture
def paced(tokenizer, tmp_path):
    return tiny_engine(tokenizer, tmp_path, cls=PacedEngine)


def health(live) -> dict:
    return httpx.get(f"{live.url}/health", timeout=30).json()


def step_until_abandoned(engine: PacedEngine, abandoned: int) -> None:
    """Let the engine decode one piece at a time until it has given up ``abandoned`` requests (or LONG pieces)."""
    for _ in range(LONG):
        if engine.metrics()["abandoned_requests"] >= abandoned:
            return
        taken = engine.taken
        engine.step()
        wait_until(
            lambda t=taken: engine.taken > t or engine.metrics()["abandoned_requests"] >= abandoned,
            "the engine to use its permit",
        )


def test_full_queue_gets_429_and_a_disconnected_stream_stops_decoding(paced):
    with serving(paced, max_active=1, max_queue=1) as live:
        url = f"{live.url}/v1/chat/completions"
        queued: dict = {}
        long = chat("Tell a long story.", max_tokens=LONG, stream=True)
        with httpx.Client(timeout=120) as client, client.stream("POST", url, json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the prefill is done, decoding waits
            second = threading.Thread(
                target=lambda: queued.update(response=httpx.post(url, json=chat("Hello", max_tokens=3), timeout=120))
            )
            second.start()
            wait_until(lambda: health(live)["queue"]["waiting"] == 1, "the second request to queue")

            third = httpx.post(url, json=chat("Hello", max_tokens=3), timeout=30)
            assert third.status_code == 429 and int(third.headers["Retry-After"]) >= 1
            error = third.json()["error"]
            assert error["type"] == "rate_limit_error" and "retry in" in error["message"]
            assert httpx.post(f"{live.url}/v1/chunks", json={"texts": ["x"]}, timeout=30).status_code == 429
            paced.step(2)  # two pieces reach the client, then it goes away mid-stream
        # leaving the block closed the connection mid-stream
        step_until_abandoned(paced, 1)
        paced.unpace()
        second.join(120)
        assert queued["response"].status_code == 200  # the queued request ran once the engine was free
        counts = paced.metrics()
        assert counts["abandoned_requests"] == 1
        assert counts["generated_tokens"] - queued["response"].json()["usage"]["completion_tokens"] < LONG
        text = httpx.get(f"{live.url}/metrics", timeout=30).text
        assert metric(text, "cacheblend_http_requests_total", endpoint="/v1/chat/completions", status="429") == 1
        assert health(live)["queue"] == {"waiting": 0, "active": 0, "max_queue": 1, "max_active": 1}


def test_a_client_that_gives_up_stops_its_non_streamed_request(paced):
    with serving(paced) as live:
        url = f"{live.url}/v1/completions"
        gave_up: dict = {}

        def impatient():
            try:
                httpx.post(
                    url,
                    json={"model": "tiny-random-llama", "prompt": "Once upon", "max_tokens": LONG},
                    timeout=httpx.Timeout(60, read=1.0),
                )
            except httpx.ReadTimeout as exc:
                gave_up["error"] = exc

        client = threading.Thread(target=impatient)
        client.start()
        wait_until(lambda: health(live)["queue"]["active"] == 1, "the request to start")
        client.join(120)  # the engine decodes nothing meanwhile: the client times out and disconnects
        assert "error" in gave_up
        step_until_abandoned(paced, 1)
        assert paced.metrics()["abandoned_requests"] == 1 and paced.metrics()["generated_tokens"] < LONG
        paced.unpace()
        again = httpx.post(
            url, json={"model": "tiny-random-llama", "prompt": "Once upon", "max_tokens": 3}, timeout=120
        )
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
        wait_until(lambda: health(live)["queue"]["active"] == 0, "the engine to be idle")


def test_requests_queue_and_all_finish(paced):
    """More clients than max_active: they wait their turn (no 429 while the queue has room) and all finish."""
    paced.unpace()
    with serving(paced, max_active=2, max_queue=8) as live:
        results: list = []

        def ask(i: int) -> None:
            body = chat(f"Question {i}: what is {i} plus {i}?", max_tokens=4, stream=i % 2 == 0)
            results.append(httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(results) == 6 and all(r.status_code == 200 for r in results)
    assert paced.metrics()["requests"] == 6 and paced.metrics()["abandoned_requests"] == 0
