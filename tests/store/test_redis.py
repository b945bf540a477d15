"""Redis tier on a real redis-server: layout, URL options, sharing between processes, outages, bad values."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import pytest
import torch

from cacheblend_rag.store import KVStore, RedisTier, tier_from_url
from cacheblend_rag.store.entry import EntryBuffers
from cacheblend_rag.store.redis_tier import parse_duration
from tests.conftest import PASSAGES, config

from .conftest import RedisServer
from .helpers import FP, random_kv, run_python

SEGMENTS_HEAD, SEGMENTS_TAIL = "Read.\n", "\nQuestion: which river?"


def segments(handles):
    return [SEGMENTS_HEAD, *handles, SEGMENTS_TAIL]


def health_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.endswith("health") and "unavailable" in r.getMessage()]


def test_layout_one_hash_per_chunk_and_one_layer_alone(redis_url):
    tier = tier_from_url(redis_url + "&ttl=1h", FP)
    kv = random_kv(layers=4)
    tier.put("ab" * 32, kv)
    rkey = tier.entry_key("ab" * 32)
    fields = sorted(f.decode() for f in tier.client.hkeys(rkey))
    assert fields == sorted(["meta"] + [f"{n}.{layer}" for n in "kv" for layer in range(4)])
    assert 3500 <= tier.client.ttl(rkey) <= 3600
    meta = json.loads(tier.client.hget(rkey, "meta"))
    assert meta["model_fingerprint"] == FP and meta["key"] == "ab" * 32 and json.loads(meta["shape"]) == [4, 2, 7, 8]
    reader = tier.open("ab" * 32)
    buffers = EntryBuffers(reader.meta)
    buffers.read(reader, 2)  # one layer, fetched and checked alone
    reader.close()
    assert torch.equal(buffers.k[2], kv.k[2]) and torch.equal(buffers.v[2], kv.v[2])
    assert tier.stats.hits == 0  # a partial read is not a hit
    got = tier.get("ab" * 32)
    assert torch.equal(got.k, kv.k) and torch.equal(got.v, kv.v) and tier.stats.hits == 1


def test_reads_refresh_the_ttl_and_ttl_0_never_expires(redis_url):
    tier = tier_from_url(redis_url + "&ttl=100", FP)
    tier.put("k" * 64, random_kv())
    rkey = tier.entry_key("k" * 64)
    tier.client.expire(rkey, 5)
    assert tier.open("k" * 64) is not None and tier.client.ttl(rkey) > 50
    forever = tier_from_url(redis_url + "&ttl=0", FP)
    forever.put("j" * 64, random_kv())
    assert forever.client.ttl(forever.entry_key("j" * 64)) == -1


def test_url_options_and_errors():
    tier = tier_from_url("redis://:s%40cret@10.1.2.3:6390/4?ttl=12h&prefix=p:&socket_timeout=0.25&backoff=2", FP)
    kwargs = tier.client.get_connection_kwargs()
    assert isinstance(tier, RedisTier) and tier.ttl == 12 * 3600 and tier.prefix == "p:"
    assert kwargs["host"] == "10.1.2.3" and kwargs["port"] == 6390 and kwargs["db"] == 4
    assert kwargs["password"] == "s@cret" and kwargs["socket_timeout"] == 0.25 and tier.health.base == 2
    assert "s@cret" not in repr(tier) and "cret" not in tier.where
    tls = tier_from_url("rediss://cache.example:6380/0?ssl_cert_reqs=none", FP)
    assert tls.client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert parse_duration("7d") == 7 * 86400 and parse_duration("30m") == 1800 and parse_duration(0) == 0
    with pytest.raises(ValueError, match="bad ttl"):
        tier_from_url("redis://localhost/0?ttl=soon", FP)
    with pytest.raises(ValueError, match="bad Redis store URL"):
        tier_from_url("redis://localhost/0?no_such_option=1", FP)


def test_two_engine_processes_share_chunks(make_engine, redis_url, tokenizer, tmp_path):
    """This process computes the chunks; another process reuses them from Redis and computes none."""
    store = ["memory://?max_bytes=1GB", redis_url]
    first = make_engine("llama", seed=3, store=store)
    handles = first.precompute(PASSAGES, context=0)  # alone: the other process names them by text alone
    expected = first.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    assert first.metrics()["store"]["redis"]["writes"] == 3
    out = run_python(
        """
        handles = [engine.handle(p) for p in PASSAGES]  # computes nothing
        result = engine.generate(["Read.\\n", *handles, "\\nQuestion: which river?"], max_new_tokens=6,
                                 config=BlendConfig(strategy="cacheblend", exact_when_faster=False))
        print(json.dumps({"tokens": result.token_ids, "hits": result.stats.cache_hits,
                          "misses": result.stats.cache_misses, "metrics": engine.metrics()}))
        """,
        {"tokenizer": tokenizer.name_or_path, "seed": 3, "store": store, "cache_dir": str(tmp_path / "other")},
    )
    assert out["hits"] == 3 and out["misses"] == 0
    assert out["metrics"]["computed_on_miss"] == 0 and out["metrics"]["store"]["redis"]["hits"] == 3
    assert out["tokens"] == expected.token_ids


def test_redis_outage_mid_run(make_engine, private_redis, caplog):
    """Stopped mid-run: requests still succeed (recomputed), one warning, hits resume once it is back."""
    url = private_redis.url + "?backoff=0.05&backoff_max=0.2&socket_timeout=0.5&socket_connect_timeout=0.5"
    engine = make_engine("llama", seed=4, store=[url])  # Redis alone: every hit comes from it
    handles = engine.precompute(PASSAGES)
    reference = engine.generate(segments(handles), max_new_tokens=5, config=config("cacheblend"))
    assert reference.stats.cache_hits == 3
    private_redis.stop()
    with caplog.at_level(logging.WARNING):
        during = [engine.generate(segments(handles), max_new_tokens=5, config=config("cacheblend")) for _ in range(6)]
    assert all(r.token_ids == reference.token_ids and r.stats.cache_misses == 3 for r in during)
    assert 1 <= len(health_warnings(caplog)) <= 2  # rate-limited: not one per request
    private_redis.start()  # a fresh, empty Redis on the same port
    caplog.clear()
    resumed = None
    with caplog.at_level(logging.WARNING):
        for _ in range(400):
            result = engine.generate(segments(handles), max_new_tokens=5, config=config("cacheblend"))
            assert result.token_ids == reference.token_ids
            if result.stats.cache_hits == 3:
                resumed = result
                break
            time.sleep(0.05)
    assert resumed is not None, "hits never resumed after Redis came back"
    assert any("available again" in r.getMessage() for r in caplog.records)


def test_slow_redis_times_out_and_requests_still_succeed(make_engine, private_redis, caplog):
    url = private_redis.url + "?backoff=0.05&backoff_max=0.1&socket_timeout=0.2"
    engine = make_engine("llama", seed=5, store=[url])
    handles = engine.precompute(PASSAGES)
    reference = engine.generate(segments(handles), max_new_tokens=4, config=config("full_reuse"))
    pauser = private_redis_client(private_redis)
    pauser.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # Redis stops answering for 1.5 s
    with caplog.at_level(logging.WARNING):
        slow = engine.generate(segments(handles), max_new_tokens=4, config=config("full_reuse"))
    assert slow.token_ids == reference.token_ids and slow.stats.cache_misses == 3
    assert health_warnings(caplog) and "Timeout" in health_warnings(caplog)[0]
    pauser.execute_command("CLIENT", "UNPAUSE")
    for _ in range(200):
        again = engine.generate(segments(handles), max_new_tokens=4, config=config("full_reuse"))
        if again.stats.cache_hits == 3:
            break
        time.sleep(0.05)
    assert again.stats.cache_hits == 3 and again.token_ids == reference.token_ids


def private_redis_client(server: RedisServer):
    import redis

    return redis.Redis.from_url(server.url)


def _truncate(tier, rkey):
    value = tier.client.hget(rkey, "v.3")
    tier.client.hset(rkey, "v.3", value[: len(value) // 2])


def _garbage_field(tier, rkey):
    value = tier.client.hget(rkey, "k.2")
    tier.client.hset(rkey, "k.2", bytes(len(value)))  # right size, wrong bytes: only the CRC can tell


def _garbage_meta(tier, rkey):
    tier.client.hset(rkey, "meta", b"\x00{not json")


def _wrong_type(tier, rkey):
    tier.client.delete(rkey)
    tier.client.set(rkey, b"garbage" * 100)


def _missing_field(tier, rkey):
    tier.client.hdel(rkey, "k.1")


def _other_model(tier, rkey):
    key = rkey[len(tier.prefix) :]
    tier.client.delete(rkey)
    other = RedisTier(tier.client, "e" * 64, prefix=tier.prefix)
    other.put(key, random_kv(tokens=30, layers=4, heads=2, dim=16, dtype=torch.float32))


def _other_key(tier, rkey):
    donor = tier.entry_key("d" * 64)
    tier.client.delete(rkey)
    tier.client.copy(donor, rkey)


CORRUPTIONS = {
    "truncated field": _truncate,
    "garbage field (same size)": _garbage_field,
    "garbage meta": _garbage_meta,
    "wrong type": _wrong_type,
    "missing field": _missing_field,
    "another model's entry": _other_model,
    "another key's entry": _other_key,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_redis_value_is_a_miss_never_used(make_engine, redis_url, caplog, corruption):
    engine = make_engine("llama", seed=6, store=[redis_url])
    tier = engine.store.tiers[0]
    handles = engine.precompute(PASSAGES)
    tier.put("d" * 64, engine.store.get(handles[0].key))  # a valid entry under another key, for _other_key
    clean = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    rkey = tier.entry_key(handles[1].key)
    CORRUPTIONS[corruption](tier, rkey)
    with caplog.at_level(logging.WARNING):
        again = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    assert again.token_ids == clean.token_ids
    assert again.stats.cache_misses == 1 and again.stats.cache_hits == 2
    assert "unusable" in caplog.text and tier.stats.corrupt == 1
    fresh = tier.get(handles[1].key)  # the bad value was replaced by the recomputed one
    assert fresh is not None and torch.equal(
        fresh.k, engine.compute_chunk(handles[1].token_ids, handles[1].context_ids).k
    )


def test_int8_store_round_trips_through_redis(redis_url):
    tier = tier_from_url(redis_url, FP)
    store = KVStore([tier], dtype="int8")
    kv = random_kv(tokens=40, layers=3, dtype=torch.float32)
    stored = store.put("q" * 64, kv)
    fields = {f.decode() for f in tier.client.hkeys(tier.entry_key("q" * 64))}
    assert {"ks.0", "vs.2"} <= fields and tier.client.hstrlen(tier.entry_key("q" * 64), "k.0") == 2 * 40 * 8
    back = tier.get("q" * 64)
    assert torch.equal(back.k, stored.k) and torch.equal(back.v, stored.v)
    assert (stored.k.float() - kv.k).abs().max() <= kv.k.abs().amax(dim=2, keepdim=True).max() / 254 + 1e-3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a TLS certificate")
def test_tls_and_password(tmp_path):
    """rediss:// with a password, against a redis-server that only speaks TLS and requires auth."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    server = RedisServer(tmp_path / "redis")
    port = server.port
    server.extra = [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(tmp_path / "cert.pem"),
        "--tls-key-file",
        str(tmp_path / "key.pem"),
        "--tls-ca-cert-file",
        str(tmp_path / "cert.pem"),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "pa ss",
    ]
    url = f"rediss://:pa%20ss@127.0.0.1:{port}/2?ssl_ca_certs={tmp_path / 'cert.pem'}"
    try:
        server.start(ping_url=url)
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS support")
    try:
        tier = tier_from_url(url, FP)
        tier.put("t" * 64, random_kv())
        assert torch.equal(tier.get("t" * 64).k, random_kv().k)
        wrong = tier_from_url(f"rediss://:wrong@127.0.0.1:{port}/2?ssl_ca_certs={tmp_path / 'cert.pem'}", FP)
        assert wrong.get("t" * 64) is None  # refused, a miss, not an exception
    finally:
        server.stop()


def test_full_redis_refuses_writes_and_requests_still_succeed(make_engine, private_redis, caplog):
    """noeviction (Redis' default) with a tiny maxmemory: the tier warns about the policy once, a refused
    write is logged, the request succeeds; under allkeys-lru there is no policy warning."""
    client = private_redis_client(private_redis)
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 400_000)  # room for 400 kB more
    client.config_set("maxmemory-policy", "noeviction")
    engine = make_engine("llama", seed=12, store=[private_redis.url + "?ttl=0"])
    big = engine.handle(" ".join(PASSAGES * 12))  # about 800 kB of KV: more than Redis may hold
    with caplog.at_level(logging.WARNING):
        handles = engine.precompute([PASSAGES[0], big.text])
        result = engine.generate(segments(handles), max_new_tokens=4, config=config("full_reuse"))
    assert result.stats.cache_misses == 1 and result.stats.cache_hits == 1  # the big chunk was never stored
    assert caplog.text.count("maxmemory-policy noeviction") == 1 and "refused a KV write" in caplog.text
    client.config_set("maxmemory-policy", "allkeys-lru")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_engine("llama", seed=13, store=[private_redis.url + "?ttl=0"]).precompute([PASSAGES[1]])
    # a write may still be refused while Redis is over its limit; what must go is the policy warning
    assert "has maxmemory-policy" not in caplog.text


# ---- sizes are checked before anything is fetched or decoded --------------------------------
def _huge_meta(client, rkey):
    client.hset(rkey, "meta", b"{" + b" " * 10_000_000 + b"}")


def _huge_field(client, rkey):
    client.hset(rkey, "k.1", bytes(10_000_000))


def _absurd_shape(client, rkey):
    meta = json.loads(client.hget(rkey, "meta"))
    shape = json.loads(meta["shape"])
    meta["shape"] = json.dumps([shape[0], shape[1], 10**12, shape[3]])
    client.hset(rkey, "meta", json.dumps(meta))


OVERSIZED = {"meta of 10 MB": _huge_meta, "field of 10 MB": _huge_field, "shape of 10**12 tokens": _absurd_shape}


@pytest.mark.parametrize("whole", [False, True], ids=["layer by layer", "whole entry"])
@pytest.mark.parametrize("damage", list(OVERSIZED))
def test_an_oversized_entry_is_refused_before_its_bytes_are_sent(make_engine, private_redis, damage, whole):
    """The entry's metadata is fetched only if it is small, and its fields only if their sizes add up to what the
    metadata says; else it is unusable (deleted, counted, recomputed) and the big value never leaves Redis."""
    engine = make_engine("llama", seed=6, store=[private_redis.url])
    tier = engine.store.tiers[0]
    handles = engine.precompute(PASSAGES)
    clean = engine.generate(segments(handles), max_new_tokens=4, config=config("cacheblend"))
    client = private_redis_client(private_redis)
    OVERSIZED[damage](client, tier.entry_key(handles[1].key))
    sent = client.info("stats")["total_net_output_bytes"]
    if whole:  # KVStore.get: the whole-entry read of chunk_kv and prefix_cache
        kv, hit = engine.chunk_kv(handles[1])
        assert not hit and kv.n_tokens == handles[1].n_tokens
    else:
        again = engine.generate(segments(handles), max_new_tokens=4, config=config("cacheblend"))
        assert again.token_ids == clean.token_ids and again.stats.cache_misses == 1
    assert client.info("stats")["total_net_output_bytes"] - sent < 2_000_000
    assert tier.stats.corrupt == 1 and tier.get(handles[1].key).n_tokens == handles[1].n_tokens  # rewritten
