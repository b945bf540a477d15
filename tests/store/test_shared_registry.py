"""The chunk registry shared through Redis: a text registered by one engine is reused by another engine's first
request; with Redis unreachable the engines go on with their own registries (slower, never wrong)."""

from __future__ import annotations

import logging
import time

import pytest

from cacheblend_rag.engine.shared_registry import SharedChunkRegistry, share_registry
from tests.conftest import PASSAGES, config

QUESTION = "\nQuestion: which river flows through Brazil?"


def chat_prompt(engine) -> str:
    return engine.format_chat([{"role": "user", "content": "Read.\n" + "\n".join(PASSAGES) + QUESTION}])


def test_a_chunk_registered_by_one_engine_is_reused_by_another(make_engine, redis_url):
    store = ["memory://?max_bytes=1GB", redis_url]
    a, b = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    shared_a, shared_b = share_registry(a), share_registry(b)
    assert isinstance(shared_a, SharedChunkRegistry) and a.registry is shared_a and b.registry is shared_b
    a.precompute(PASSAGES)
    expected = a.generate(prompt=chat_prompt(a), max_new_tokens=6, config=config("cacheblend"))
    assert expected.stats.cache_hits == 3

    result = b.generate(prompt=chat_prompt(b), max_new_tokens=6, config=config("cacheblend"))  # b's first request
    assert result.stats.cache_hits == 3 and result.stats.cache_misses == 0
    assert result.token_ids == expected.token_ids
    assert b.metrics()["precomputed_chunks"] == 0 and b.metrics()["computed_on_miss"] == 0
    assert b.metrics()["store"]["redis"]["hits"] == 3  # the KV came from Redis, the texts from the stream
    assert shared_a.stats()["published"] == 3 and shared_b.stats()["received"] == 3
    # a third engine started later reads the stream from the start
    c = make_engine(seed=7, store=store)
    share_registry(c)
    assert len(c.registry) == 3 and c.registry.lookup(PASSAGES[0]).key == a.handle(PASSAGES[0]).key


def test_other_models_do_not_see_the_texts(make_engine, redis_url):
    store = ["memory://?max_bytes=1GB", redis_url]
    a, other = make_engine(seed=7, store=store), make_engine(seed=8, store=store)
    share_registry(a)
    share_registry(other)
    a.precompute(PASSAGES)
    assert other.registry.sync() == 0 and len(other.registry) == 0
    assert a.registry.key != other.registry.key


def test_unreachable_redis_is_slower_never_wrong(make_engine, private_redis, caplog):
    url = private_redis.url + "?backoff=0.05&backoff_max=0.2&socket_timeout=0.5&socket_connect_timeout=0.5"
    store = ["memory://?max_bytes=1GB", url]
    a, b = make_engine(seed=9, store=store), make_engine(seed=9, store=store)
    share_registry(a)
    share_registry(b)
    private_redis.stop()
    with caplog.at_level(logging.WARNING):
        a.precompute(PASSAGES)  # registered locally, not published yet
        alone = b.generate(prompt=chat_prompt(b), max_new_tokens=6, config=config("cacheblend"))
    plain = b.generate(prompt=chat_prompt(b), max_new_tokens=6, config=config("full_recompute"))
    assert alone.stats.cache_hits == 0 and alone.token_ids == plain.token_ids  # b computed the text itself
    assert a.registry.stats()["unpublished"] == 3 and any("unavailable" in r.getMessage() for r in caplog.records)

    private_redis.start()  # empty: the KV a wrote meanwhile is lost, the texts are still pending in a
    for _ in range(200):  # the first sync after the backoff delay publishes them
        a.registry.sync()
        if a.registry.stats()["unpublished"] == 0:
            break
        time.sleep(0.05)
    assert a.registry.stats()["unpublished"] == 0
    for _ in range(200):  # b's own backoff (its failures came later than a's) may still be running
        if b.registry.sync() or len(b.registry) == 3:
            break
        time.sleep(0.05)
    later = b.generate(prompt=chat_prompt(b), max_new_tokens=6, config=config("cacheblend"))
    reference = a.generate(prompt=chat_prompt(a), max_new_tokens=6, config=config("cacheblend"))
    assert later.stats.cache_misses == 3  # b knows the chunks now; their KV was never in Redis: computed
    assert later.token_ids == reference.token_ids and len(b.registry) == 3


def test_a_foreign_value_at_the_stream_key_is_logged_once(make_engine, redis_url, caplog):
    engine = make_engine(seed=7, store=["memory://?max_bytes=1GB", redis_url])
    tier = engine.store.tiers[1]
    tier.client.set(f"{tier.prefix}registry:{engine.fingerprint}", b"not a stream")
    with caplog.at_level(logging.WARNING):
        shared = share_registry(engine)
        engine.precompute(PASSAGES)
        result = engine.generate(prompt=chat_prompt(engine), max_new_tokens=4, config=config("cacheblend"))
    assert result.stats.cache_hits == 3  # the local registry works
    assert sum("refused the shared chunk registry" in r.getMessage() for r in caplog.records) == 1
    assert shared.stats()["errors"] >= 2


def test_share_registry_needs_an_empty_registry_and_a_redis_tier(make_engine, redis_url):
    assert share_registry(make_engine(store=["memory://"])) is None
    engine = make_engine(store=["memory://", redis_url])
    engine.precompute(PASSAGES[:1])
    with pytest.raises(ValueError, match="before chunks are registered"):
        share_registry(engine)


def test_engines_that_read_the_stream_keep_it_from_expiring(make_engine, redis_url):
    engine = make_engine(seed=7, store=["memory://?max_bytes=1GB", redis_url + "&ttl=1h"])
    shared = share_registry(engine)
    engine.precompute(PASSAGES[:1])
    client = engine.store.tiers[1].client
    assert 3500 < client.ttl(shared.key) <= 3600  # set when a text is appended
    client.expire(shared.key, 30)
    shared.touch_every = 0
    shared.sync()
    assert client.ttl(shared.key) > 3500  # a reading engine refreshed it
