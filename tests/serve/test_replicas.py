"""Two replicas (two engines, each with its own memory tier, one Redis) behind their own HTTP servers: chunks
registered through replica A are reused by replica B on its first request; with Redis unreachable both keep
answering, B then computes the chunks itself (slower, never wrong)."""

from __future__ import annotations

import httpx

from cacheblend_rag.engine.shared_registry import share_registry
from tests.conftest import PASSAGES

from .conftest import chat, metric, serving, tiny_engine

QUESTION = "Answer from the passages.\n" + "\n\n".join(PASSAGES) + "\nQuestion: which mountain is in Tanzania?"


def replicas(tokenizer, tmp_path, store_url: str):
    store = ["memory://?max_bytes=1GB", store_url]
    engines = [tiny_engine(tokenizer, tmp_path / name, store=store, seed=11) for name in ("a", "b")]
    for engine in engines:
        share_registry(engine)
    return engines


def ask(live, **body) -> dict:
    response = httpx.post(f"{live.url}/v1/chat/completions", json=chat(QUESTION, max_tokens=6, **body), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_chunks_registered_through_a_are_reused_by_b_first_request(tokenizer, tmp_path, redis_url):
    a, b = replicas(tokenizer, tmp_path, redis_url)
    with serving(a) as replica_a, serving(b) as replica_b:
        registered = httpx.post(f"{replica_a.url}/v1/chunks", json={"texts": PASSAGES}, timeout=120).json()
        assert registered["computed"] == 3
        answer_b = ask(replica_b)  # b's first request
        answer_a = ask(replica_a)
        metrics_b = httpx.get(f"{replica_b.url}/metrics", timeout=30).text
        health_b = httpx.get(f"{replica_b.url}/health", timeout=30).json()
    report = answer_b["cacheblend"]
    assert report["cache_hits"] == 3 and report["cache_misses"] == 0
    assert answer_b["usage"]["prompt_tokens_details"]["cached_tokens"] == report["reused_tokens"] > 0
    assert answer_b["choices"][0]["message"]["content"] == answer_a["choices"][0]["message"]["content"]
    # the same usage, but for the prompt's head: b computed and stored it, a read it
    head = answer_a["cacheblend"]["head_tokens"] - report["head_tokens"]
    assert {**answer_b["usage"], "prompt_tokens_details": None} == {**answer_a["usage"], "prompt_tokens_details": None}
    assert answer_a["usage"]["prompt_tokens_details"]["cached_tokens"] == report["reused_tokens"] + head
    # b computed nothing: the texts came through the shared registry, the KV from Redis
    assert metric(metrics_b, "cacheblend_store_hits_total", tier="redis") == 3
    assert metric(metrics_b, "cacheblend_engine_precomputed_chunks_total") == 0
    assert metric(metrics_b, "cacheblend_engine_computed_on_miss_total") == 0
    assert metric(metrics_b, "cacheblend_shared_registry_received_total") == 3
    assert health_b["shared_registry"]["available"] and health_b["registered_chunks"] == 3


def test_replicas_with_redis_down_are_slower_never_wrong(tokenizer, tmp_path, private_redis):
    url = private_redis.url + "?backoff=0.05&backoff_max=0.2&socket_timeout=0.5&socket_connect_timeout=0.5"
    a, b = replicas(tokenizer, tmp_path, url)
    private_redis.stop()
    with serving(a) as replica_a, serving(b) as replica_b:
        registered = httpx.post(f"{replica_a.url}/v1/chunks", json={"texts": PASSAGES}, timeout=120)
        assert registered.status_code == 200  # stored in a's memory tier, registered in a's own registry
        answer_b = ask(replica_b)
        plain_b = ask(replica_b, cacheblend={"strategy": "full_recompute"})
        answer_a = ask(replica_a)
        health_a = httpx.get(f"{replica_a.url}/health", timeout=30).json()
        health_b = httpx.get(f"{replica_b.url}/health", timeout=30).json()
    assert answer_b["cacheblend"]["cache_hits"] == 0
    assert answer_b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert answer_b["choices"][0]["message"]["content"] == plain_b["choices"][0]["message"]["content"]
    assert answer_a["cacheblend"]["cache_hits"] == 3  # a still reuses from its memory tier
    assert {t["tier"]: t["available"] for t in health_a["store"]} == {"memory": True, "redis": False}
    assert health_a["shared_registry"]["unpublished"] == 3 and not health_b["shared_registry"]["available"]


def test_a_tampered_registry_stops_no_replica_and_fails_no_request(tokenizer, tmp_path, redis_url):
    """A non-UTF-8 or oversized entry in the registry stream fails no request on a running replica and stops no
    replica that starts afterwards (neither decodes nor tokenizes an oversized one); /health says the registry is
    unavailable while Redis answers WRONGTYPE."""
    a, b = replicas(tokenizer, tmp_path, redis_url)
    client, key = a.registry.tier.client, a.registry.key
    with serving(a) as replica_a, serving(b) as replica_b:
        client.xadd(key, {"t": b"\xff\xfe"})
        client.xadd(key, {"t": b"x" * (a.registry.max_text_bytes + 1)})
        registered = httpx.post(f"{replica_a.url}/v1/chunks", json={"texts": PASSAGES}, timeout=120)
        assert registered.status_code == 200, registered.text
        answer_b = ask(replica_b)  # b reads the bad entries, then the good ones
        late = tiny_engine(tokenizer, tmp_path / "late", store=["memory://?max_bytes=1GB", redis_url], seed=11)
        assert len(share_registry(late)) == 3  # a replica started afterwards starts, with the good texts
        health_b = httpx.get(f"{replica_b.url}/health", timeout=30).json()
        client.delete(key)
        client.set(key, b"not a stream")
        refused_b = ask(replica_b)  # answered from b's own registry
        refused_health_b = httpx.get(f"{replica_b.url}/health", timeout=30).json()
    assert answer_b["cacheblend"]["cache_hits"] == 3 and refused_b["cacheblend"]["cache_hits"] == 3
    assert health_b["shared_registry"]["available"] and health_b["shared_registry"]["rejected"] == 2
    assert not refused_health_b["shared_registry"]["available"]
