"""Limits a request meets before it costs the engine anything, over real HTTP: a prompt refused by its bytes
before it is tokenized, a prompt past the context window refused after a tokenization off the engine's thread,
``max_tokens`` capped (and the response saying so), a chunk registration stopped between its steps when its
client leaves, and a 429 whose numbers are the queue's."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from cacheblend_rag.serve.options import ServerOptions
from cacheblend_rag.serve.scheduler import QueueFull, Scheduler

from .conftest import MODEL, PacedEngine, chat, metric, serving, tiny_engine, wait_until


@pytest.fixture
def engine(tokenizer, tmp_path):
    return tiny_engine(tokenizer, tmp_path)


def record_tokenizing(engine) -> list[tuple[str, int]]:
    """Wrap the engine's tokenizer: returns the list it fills with (thread name, characters) per call."""
    calls: list[tuple[str, int]] = []
    tokenize = engine.prompt_format.tokenize

    def recording(text):
        calls.append((threading.current_thread().name, len(text)))
        return tokenize(text)

    engine.prompt_format.tokenize = recording
    return calls


def test_prompts_are_refused_by_bytes_then_by_tokens_off_the_engine_thread(engine):
    calls = record_tokenizing(engine)
    limit = engine.context_window * 32  # the default --max-prompt-bytes
    with serving(engine) as live:
        url = f"{live.url}/v1/completions"
        huge = httpx.post(url, json={"model": MODEL, "prompt": "a" * (limit + 1)}, timeout=60)
        assert huge.status_code == 413, huge.text
        error = huge.json()["error"]
        assert error["code"] == "prompt_too_large" and "--max-prompt-bytes" in error["message"]
        assert not any(n > limit for _, n in calls)  # never tokenized
        chat_huge = httpx.post(f"{live.url}/v1/chat/completions", json=chat("é" * (limit // 2 + 1)), timeout=60)
        assert chat_huge.status_code == 413 and chat_huge.json()["error"]["param"] == "messages"
        many = [{"role": "user", "content": "a b c d"}] * 2040  # a few bytes of text, many template headers
        templated = httpx.post(f"{live.url}/v1/chat/completions", json=chat(many), timeout=60)
        assert templated.status_code == 413 and templated.json()["error"]["code"] == "prompt_too_large"
        assert not any(n > limit for _, n in calls)

        over = "Lorem ipsum dolor sit amet. " * 400  # within the bytes, past the context window
        long = httpx.post(url, json={"model": MODEL, "prompt": over}, timeout=60)
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert "context window is 2048" in long.json()["error"]["message"]
        threads = {name for name, n in calls if n == len(over)}
        assert threads and all(name.startswith("cacheblend-tokenize") for name in threads), threads
        assert engine.metrics()["requests"] == 0  # the engine never saw it
    with serving(engine, max_prompt_bytes=100) as live:
        small = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "b" * 101}, timeout=60)
        assert small.status_code == 413 and "at most 100 bytes" in small.json()["error"]["message"]


def test_max_tokens_is_a_cap_and_the_response_says_so(engine):
    with serving(engine, max_tokens=3) as live:
        url = f"{live.url}/v1/chat/completions"
        asked = httpx.post(url, json=chat("Tell me everything.", max_tokens=10**9), timeout=60)
        body = asked.json()
        assert asked.status_code == 200 and body["usage"]["completion_tokens"] <= 3
        assert body["cacheblend"]["max_tokens"] == {"requested": 10**9, "allowed": 3}
        assert asked.headers["X-CacheBlend-Max-Tokens-Clamped"] == "1000000000->3"
        newer = httpx.post(url, json=chat("Tell me everything.", max_completion_tokens=50, stream=True), timeout=60)
        assert newer.headers["X-CacheBlend-Max-Tokens-Clamped"] == "50->3"
        assert newer.text.count('"content"') <= 4 and newer.text.endswith("data: [DONE]\n\n")
        default = httpx.post(url, json=chat("Tell me everything."), timeout=60)
        assert default.json()["usage"]["completion_tokens"] <= 3 and "max_tokens" not in default.json()["cacheblend"]
        assert "X-CacheBlend-Max-Tokens-Clamped" not in default.headers
    with serving(engine, max_tokens=8, default_max_tokens=2) as live:
        url = f"{live.url}/v1/chat/completions"
        assert httpx.post(url, json=chat("Hello"), timeout=60).json()["usage"]["completion_tokens"] <= 2
        within = httpx.post(url, json=chat("Hello", max_tokens=8), timeout=60)
        assert within.status_code == 200 and "X-CacheBlend-Max-Tokens-Clamped" not in within.headers


def test_a_chunk_registration_stops_between_steps_when_its_client_leaves(tokenizer, tmp_path):
    paced = tiny_engine(tokenizer, tmp_path, cls=PacedEngine)
    texts = [f"Passage {i}: " + "the river runs to the sea and back again " * 160 for i in range(6)]
    assert 1000 < len(paced.tokenize(texts[0])) < 2000  # two texts per step of 4096 tokens: three steps
    with serving(paced) as live:
        scheduler = live.app.state.scheduler
        left: dict = {}

        def impatient():
            try:
                httpx.post(f"{live.url}/v1/chunks", json={"texts": texts}, timeout=httpx.Timeout(60, read=1.0))
            except httpx.ReadTimeout as exc:
                left["error"] = exc

        client = threading.Thread(target=impatient)
        client.start()
        wait_until(lambda: scheduler.active == 1, "the job to start")
        paced.step()  # the first step (two texts)
        client.join(60)  # the client gives up while the second step waits for its permit
        assert "error" in left
        wait_until(lambda: all(t.cancelled for t in scheduler.running()), "the server to notice")
        paced.step()  # the second step, already under way, finishes; the third never starts
        wait_until(lambda: scheduler.active == 0, "the job to stop")
        paced.unpace()
        registered = [paced.registry.lookup(t) is not None for t in texts]
        assert registered == [True, True, True, True, False, False]
        text = httpx.get(f"{live.url}/metrics", timeout=30).text
        assert metric(text, "cacheblend_http_requests_total", endpoint="/v1/chunks", status="499") == 1
        again = httpx.post(f"{live.url}/v1/chunks", json={"texts": texts}, timeout=120).json()
        assert again["computed"] == 2 and again["already_stored"] == 4


def test_the_429_message_counts_what_the_queue_holds():
    async def main():
        scheduler = Scheduler(max_active=2, max_queue=1)  # not started: nothing is admitted yet
        for _ in range(3):  # two will start at once, one waits
            scheduler.submit(lambda: iter(()))
        with pytest.raises(QueueFull) as full:
            scheduler.submit(lambda: iter(()))
        return full.value

    full = asyncio.run(main())
    assert (full.running, full.waiting, full.max_active, full.max_queue) == (2, 1, 2, 1)
    assert "2 running (max_active 2), 1 waiting (max_queue 1)" in str(full)


def test_lists_no_request_could_use_are_refused_before_the_body_is_validated(engine):
    """Validating a body holds the event loop: a 15 MB body of 400,000 one-letter messages held every request,
    /health included, for 5 s. A list longer than any request that fits the context window has is refused on the
    parsed JSON first: the error is about its length, never a validation error of one of its items."""
    n = engine.context_window + 1
    with serving(engine, max_chunk_texts=8) as live:
        url = f"{live.url}/v1/chat/completions"
        for messages in ([{"role": "tool", "content": 1}] * n, [{"role": "user", "content": [{"type": "x"}] * n}]):
            error = httpx.post(url, json=chat(messages), timeout=60).json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
            assert f"{n} messages or content parts" in error["message"]
        error = httpx.post(url, json=chat("hi", stop=[1] * 5), timeout=60).json()["error"]
        assert error["param"] == "stop" and "send at most 4" in error["message"]
        text = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": [1, 2]}, timeout=60)
        assert "send one prompt per request" in text.json()["error"]["message"]
        chunks = httpx.post(f"{live.url}/v1/chunks", json={"texts": [1] * 9}, timeout=60)
        assert chunks.status_code == 413 and chunks.json()["error"]["code"] == "too_many_texts"
    assert engine.metrics()["requests"] == 0


def test_the_default_body_limit_is_what_the_largest_request_needs():
    """Twice the largest text a request may carry (room for JSON's escapes), at least 1 MiB; it was 16 MiB, and
    json.loads of a 16 MB body holds the event loop for seconds."""
    assert ServerOptions().resolved(8192, "m").max_body_bytes == 2 * 65536 * 32  # chunk texts: 2 MiB
    assert ServerOptions(max_prompt_bytes=8 << 20).resolved(8192, "m").max_body_bytes == 16 << 20
    assert ServerOptions(max_chunk_tokens=10).resolved(100, "m").max_body_bytes == 1 << 20
    assert ServerOptions(max_body_bytes=5).resolved(100, "m").max_body_bytes == 5
