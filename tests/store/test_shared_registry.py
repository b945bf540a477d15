"""The chunk registry shared through Redis: a text registered by one engine is reused by another engine's first
request; with Redis unreachable the engines go on with their own registries (slower, never wrong)."""

from __future__ import annotations

import logging
import time

import pytest

from cacheblend_rag.engine.shared_registry import (
    BYTES_PER_TOKEN,
    SharedChunkRegistry,
    encode_context,
    share_registry,
)
from cacheblend_rag.store.keys import scope_salt
from tests.conftest import PASSAGES, config

QUESTION = "\nQuestion: which river flows through Brazil?"


def chat_prompt(engine) -> str:
    return engine.format_chat([{"role": "user", "content": "Read.\n" + "\n".join(PASSAGES) + QUESTION}])


def test_a_chunk_registered_by_one_engine_is_reused_by_another(make_engine, redis_url):
    store = ["memory://?max_bytes=1GB", redis_url]
    a, b = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    shared_a, shared_b = share_registry(a), share_registry(b)
    assert isinstance(shared_a, SharedChunkRegistry) and a.registry is shared_a and b.registry is shared_b
    handles = a.precompute(PASSAGES)  # each after its 2 nearest: the registry carries the context
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
    assert len(c.registry) == 3 and c.registry.lookup(PASSAGES[0]) == handles[0]


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
    assert shared.stats()["errors"] >= 1 and not shared.available  # refused calls back off like failed ones


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


# ---- what is read from the stream is untrusted -------------------------------------------------------
def stream_key(engine) -> str:
    tier = engine.store.tiers[1]
    return f"{tier.prefix}registry:{engine.fingerprint}"


def _not_utf8(engine):
    return {"t": b"\xff\xfe"}


def _no_text_field(engine):
    return {"x": PASSAGES[0].encode()}


def _empty_text(engine):
    return {"t": b""}


def _too_short(engine):
    return {"t": b"Hi there"}  # under registry.min_tokens


def _over_the_byte_bound(engine):
    return {"t": b"A" * (engine.registry.max_text_bytes + 1)}


def _over_the_context_window(engine):  # few enough bytes, too many tokens for any prompt
    return {"t": (" 7" * (engine.context_window + 10)).encode()}


def _context_not_whole_ids(engine):
    return {"t": PASSAGES[0].encode() + b" ", "c": b"\x01\x02\x03"}


def _context_outside_the_vocabulary(engine):
    return {"t": PASSAGES[0].encode() + b" ", "c": encode_context([engine.model.config.vocab_size])}


def _context_over_the_context_window(engine):
    return {"t": PASSAGES[0].encode() + b" ", "c": encode_context([7] * engine.context_window)}


BAD_ENTRIES = {
    "context not whole token ids": _context_not_whole_ids,
    "context outside the vocabulary": _context_outside_the_vocabulary,
    "context over the context window": _context_over_the_context_window,
    "not UTF-8": _not_utf8,
    "no text field": _no_text_field,
    "empty text": _empty_text,
    "too short to register": _too_short,
    "over the byte bound": _over_the_byte_bound,
    "over the context window": _over_the_context_window,
}


@pytest.mark.parametrize("bad", list(BAD_ENTRIES))
def test_a_bad_entry_neither_stops_a_start_nor_fails_a_request(make_engine, redis_url, bad):
    """printf '\\xff\\xfe' | redis-cli -x xadd <key> '*' t stopped every replica started afterwards (exit 2) and
    failed one request of a running one with a 400: a bad entry is skipped and counted, the good ones around it
    are registered."""
    store = ["memory://?max_bytes=1GB", redis_url]
    writer, running = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    share_registry(writer)
    share_registry(running)
    client = writer.store.tiers[1].client
    writer.precompute(PASSAGES[:1])
    client.xadd(stream_key(writer), BAD_ENTRIES[bad](running))  # the running replica has not read it yet
    writer.precompute(PASSAGES[1:])
    result = running.generate(prompt=chat_prompt(running), max_new_tokens=4, config=config("cacheblend"))
    assert result.stats.cache_hits == 3 and running.registry.stats()["rejected"] == 1

    late = make_engine(seed=7, store=store)
    shared = share_registry(late)  # raised UnicodeDecodeError for the first case: the CLI exited with 2
    assert len(late.registry) == 3 and shared.stats()["received"] == 3 and shared.stats()["rejected"] == 1
    result = late.generate(prompt=chat_prompt(late), max_new_tokens=4, config=config("cacheblend"))
    assert result.stats.cache_hits == 3


def test_a_huge_entry_is_never_sent_decoded_or_tokenized(make_engine, private_redis):
    """A 10.8 MB text in the stream stalled a request 22 s and took both replicas to ~2.2 GB RSS: an entry
    over the byte bound is refused inside Redis, so its bytes never reach the engine."""
    import redis

    store = ["memory://?max_bytes=1GB", private_redis.url]
    engine = make_engine(seed=7, store=store)
    client = redis.Redis.from_url(private_redis.url)
    huge = (" ".join(PASSAGES) + "\n").encode() * 35_000  # 10.8 MB of good UTF-8 text
    assert len(huge) > 10_000_000
    client.xadd(stream_key(engine), {"t": huge})
    client.xadd(stream_key(engine), {"t": PASSAGES[0].encode()})
    tokenized = []

    def make_handle(text):
        tokenized.append(len(text))
        return engine.handle(text)

    sent = client.info("stats")["total_net_output_bytes"]
    shared = SharedChunkRegistry(
        engine.store.tiers[1], engine.fingerprint, make_handle, max_text_bytes=64 << 10, context_window=2048
    )
    assert shared.sync() == 1 and shared.stats()["rejected"] == 1 and tokenized == [len(PASSAGES[0])]
    assert client.info("stats")["total_net_output_bytes"] - sent < 100_000  # not the 10.8 MB


def test_the_byte_bound_follows_the_context_window(make_engine, redis_url):
    engine = make_engine(seed=7, store=["memory://?max_bytes=1GB", redis_url])
    shared = share_registry(engine)
    assert shared.max_text_bytes == BYTES_PER_TOKEN * engine.context_window
    long_text = "word " * (shared.max_text_bytes // 5 + 1)
    assert len(long_text.encode()) > shared.max_text_bytes
    shared.register(engine.handle(long_text))  # kept here, but not offered to engines that would refuse it
    assert shared.stats()["published"] == 0 and shared.stats()["unpublished"] == 0


def test_a_refused_call_makes_the_registry_unavailable_until_it_succeeds(make_engine, redis_url):
    """/health said available: true while Redis answered WRONGTYPE to every registry call."""
    engine = make_engine(seed=7, store=["memory://?max_bytes=1GB", redis_url + "&backoff=0.05&backoff_max=0.1"])
    client = engine.store.tiers[1].client
    client.set(stream_key(engine), b"not a stream")
    shared = share_registry(engine)
    assert not shared.available and shared.health.down
    engine.precompute(PASSAGES)
    assert shared.stats()["unpublished"] == 3
    client.delete(stream_key(engine))
    for _ in range(100):
        shared.sync()
        if shared.available:
            break
        time.sleep(0.05)
    assert shared.available and not shared.health.down and shared.stats()["unpublished"] == 0


# ---- Redis lost its data -----------------------------------------------------------------------
def test_a_replica_republishes_its_texts_once_redis_lost_them(make_engine, private_redis):
    """After FLUSHALL (or a restart without persistence) new replicas found no texts: 0% reuse. A replica that
    finds the stream gone while it holds texts republishes them, once, and the others do not."""
    import redis

    url = private_redis.url + "?backoff=0.05&backoff_max=0.2"
    store = ["memory://?max_bytes=1GB", url]
    a, b = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    share_registry(a)
    share_registry(b)
    a.precompute(PASSAGES)
    assert b.registry.sync() == 3
    client = redis.Redis.from_url(private_redis.url)
    client.flushall()

    a.registry.sync()  # finds the stream gone: republishes the three texts it holds
    b.registry.sync()  # finds them there: nothing to do
    a.registry.sync()
    b.registry.sync()
    assert client.xlen(stream_key(a)) == 3
    assert a.registry.stats()["republished"] == 3 and b.registry.stats()["republished"] == 0

    c = make_engine(seed=7, store=store)
    share_registry(c)
    assert len(c.registry) == 3
    result = c.generate(prompt=chat_prompt(c), max_new_tokens=4, config=config("cacheblend"))
    assert result.stats.cache_misses == 3  # the KV was lost too: computed once, on first use
    again = c.generate(prompt=chat_prompt(c), max_new_tokens=4, config=config("cacheblend"))
    assert again.stats.cache_hits == 3


def test_a_replica_that_registers_first_after_the_loss_republishes_too(make_engine, private_redis):
    import redis

    store = ["memory://?max_bytes=1GB", private_redis.url]
    a = make_engine(seed=7, store=store)
    share_registry(a)
    a.precompute(PASSAGES[:2])
    client = redis.Redis.from_url(private_redis.url)
    private_redis.stop()
    private_redis.start()  # no persistence: empty
    a.precompute(PASSAGES[2:])  # its XADD recreates the stream: the first two texts come back with it
    assert client.xlen(stream_key(a)) == 3 and a.registry.stats()["republished"] == 2
    late = make_engine(seed=7, store=store)
    share_registry(late)
    assert len(late.registry) == 3


# ---- a flood of registrations evicts the least recently used texts --------------------------------------------
def test_a_flood_evicts_least_recently_used_not_oldest_registered():
    from cacheblend_rag import ChunkHandle
    from cacheblend_rag.engine.registry import ChunkRegistry

    def handle(n):
        ids = [100 + n] * 2 + [n, n]
        return ChunkHandle(f"k{n}", f"text {n}", tuple(ids), "fp")

    registry = ChunkRegistry(max_entries=3, min_tokens=2)
    for n in range(3):
        registry.register(handle(n))
    assert registry.split([9, *handle(0).token_ids, 9])[1] == handle(0)  # a match is a use
    registry.register(handle(3))  # evicts 1, the least recently used, not 0, the oldest
    assert "text 0" in registry and "text 1" not in registry
    assert registry.lookup("text 2") == handle(2)  # a lookup is a use
    registry.register(handle(4))  # evicts 0
    assert [t for t in ("text 0", "text 2", "text 3", "text 4") if t in registry] == ["text 2", "text 3", "text 4"]


def test_texts_in_use_stay_in_the_shared_stream_through_a_flood(make_engine, redis_url):
    """The stream keeps the last ~max_entries texts and a new replica keeps the last max_entries it reads: a text
    still in use is appended again (at most once per max_entries / 2 entries), so a flood does not push it out."""
    store = ["memory://?max_bytes=1GB", redis_url]
    user = make_engine(seed=7, store=store, registry_size=6)
    flooder = make_engine(seed=7, store=store, registry_size=6)
    share_registry(user)
    share_registry(flooder)
    user.precompute(PASSAGES)
    flood = [f"Flood text number {i} says nothing of interest to anyone at all." for i in range(8)]
    flooder.precompute(flood[:3])
    prompt = user.format_chat([{"role": "user", "content": "Read.\n" + PASSAGES[0] + QUESTION}])
    assert user.generate(prompt=prompt, max_new_tokens=2, config=config("cacheblend")).stats.cache_hits == 1
    user.registry.sync()  # publishes the text in use again
    flooder.precompute(flood[3:])
    late = make_engine(seed=7, store=store, registry_size=6)
    share_registry(late)
    assert PASSAGES[0] in late.registry  # the oldest registration, still in use
    assert PASSAGES[1] not in late.registry  # not used since: evicted


# ---- one stream per registry scope ----------------------------------------------------------------------------------
def test_scopes_do_not_see_each_others_texts(make_engine, redis_url):
    """Each registry scope of the engine is shared through a stream of its own, named by the scope's salt (never by
    its name); another engine sees a scope's texts in that scope only, with the scope's salted handles."""
    store = ["memory://?max_bytes=1GB", redis_url]
    engine, other = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    default = share_registry(engine)
    assert default.key == stream_key(engine)  # the default stream is where it always was
    alice, bob = engine.registry_for("alice key"), engine.registry_for("bob")
    assert isinstance(alice, SharedChunkRegistry) and alice.key == f"{stream_key(engine)}:{scope_salt('alice key')}"
    assert "alice" not in alice.key and bob.key != alice.key
    [handle] = engine.precompute([PASSAGES[0]], scope="alice key")
    engine.precompute([PASSAGES[1]], scope="bob")
    assert handle.key == engine.handle(PASSAGES[0], scope="alice key").key != engine.handle(PASSAGES[0]).key
    assert bob.sync() == 0 and default.sync() == 0 and PASSAGES[0] not in bob and PASSAGES[0] not in default
    share_registry(other)
    alice_elsewhere = other.registry_for("alice key")
    assert PASSAGES[0] in alice_elsewhere and PASSAGES[1] not in alice_elsewhere
    assert alice_elsewhere.lookup(PASSAGES[0]).key == handle.key  # the scope's salted KV, found by the other engine
    assert PASSAGES[0] not in other.registry and PASSAGES[0] not in other.registry_for("bob")


def test_entries_with_extreme_ids_and_extra_fields(make_engine, redis_url):
    """Entries appended with explicit ids (the largest sequence number of a millisecond), several fields, or a
    text field that is not the first: the reader keeps its place in the stream and reads the text."""
    store = ["memory://?max_bytes=1GB", redis_url]
    engine = make_engine(seed=7, store=store)
    client = engine.store.tiers[1].client
    client.xadd(stream_key(engine), {"t": PASSAGES[1].encode(), "t2": b"ignored"}, id="4-0")
    client.xadd(stream_key(engine), {"x": b"\xff", "t": PASSAGES[0].encode()}, id=f"5-{2**64 - 1}")
    shared = share_registry(engine)
    assert len(shared) == 2 and shared.stats()["rejected"] == 0 and shared.available
    client.xadd(stream_key(engine), {"t": PASSAGES[2].encode()})
    assert shared.sync() == 1 and len(shared) == 3 and shared.available  # read on from id 6-0


def test_a_shared_registry_finds_chunks_without_their_edge_whitespace(make_engine, redis_url):
    """Chunk texts ending in a blank line are found by their core in prompts sent to another engine too: the shared
    registries are made with the engine's whitespace rule (and its min_tokens), not the registry's defaults."""
    store = ["memory://?max_bytes=1GB", redis_url]
    texts = [f"Title {i}\n\n{p}\n\n" for i, p in enumerate(PASSAGES[:3])]
    engine, other = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    share_registry(engine)
    engine.precompute(texts)
    engine.precompute(texts[:1], scope="s")
    share_registry(other)
    prompt = "Read:\n" + "".join(texts) + "\nQuestion: which river reaches the Black Sea?"
    found = [b for b in other.blocks(prompt=prompt) if b.handle is not None]
    assert [b.handle.text for b in found] == texts
    scoped = [b for b in other.blocks(prompt=prompt, scope="s") if b.handle is not None]
    assert [b.handle.text for b in scoped] == texts[:1]


def test_a_context_chunk_round_trips_between_engines(make_engine, redis_url):
    """A chunk precomputed after a context by one engine is found by another with the same context (so the same
    key: its KV comes from Redis, nothing is computed) from a prompt that holds only the chunk's text."""
    store = ["memory://?max_bytes=1GB", redis_url]
    a, b = make_engine(seed=7, store=store), make_engine(seed=7, store=store)
    share_registry(a)
    share_registry(b)
    a.precompute([PASSAGES[0]])  # registered alone first, then again with a context: the context one wins
    handles = a.precompute(PASSAGES, context=2)
    prompt = a.format_chat([{"role": "user", "content": "Read.\n" + PASSAGES[1] + QUESTION}])
    result = b.generate(prompt=prompt, max_new_tokens=2, config=config("full_reuse"))
    assert result.stats.cache_hits == 1 and result.stats.cache_misses == 0
    assert b.registry.lookup(PASSAGES[1]) == handles[1] and handles[1].context_ids
    assert b.registry.lookup(PASSAGES[0]) == handles[0]
    assert b.metrics()["computed_on_miss"] == 0 and b.metrics()["store"]["redis"]["hits"] == 1
    late = make_engine(seed=7, store=store)
    share_registry(late)
    assert late.registry.lookup(PASSAGES[2]) == handles[2] and late.registry.stats()["rejected"] == 0
