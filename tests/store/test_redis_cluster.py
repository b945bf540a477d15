"""Redis Cluster tier on a real three-node cluster on loopback: URL form, entries spread over the nodes, engines
sharing blocks through it, and one node killed mid-run (its blocks are recomputed, the others still served)."""

from __future__ import annotations

import pytest
import torch

from cacheblend_rag.engine.shared_registry import share_registry
from cacheblend_rag.store import tier_from_url
from cacheblend_rag.store.redis_cluster import RedisClusterTier, parse_cluster_url
from tests.conftest import PASSAGES, config

from .cluster import RedisClusterServers
from .helpers import FP, random_kv

MORE = [
    "Lake Baikal in Siberia is the deepest lake in the world, reaching a depth of 1,642 metres.",
    "The Sahara is the largest hot desert on Earth, covering most of North Africa.",
    "Marie Curie was the first person to win two Nobel Prizes, in physics in 1903 and in chemistry in 1911.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level at 8,849 metres.",
    "The Great Barrier Reef off Queensland is the largest coral reef system in the world.",
    "The Atacama Desert in Chile is one of the driest places on Earth.",
]
CHUNKS = PASSAGES + MORE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield servers
    servers.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own, which it may break."""
    servers = RedisClusterServers(tmp_path / "cluster").start()
    yield servers
    servers.stop()


def prompt(handles):
    return ["Read the passages.\n", *handles, "\nQuestion: which is the deepest lake?"]


def test_url_form_options_and_errors():
    nodes, ours, theirs = parse_cluster_url(
        "redis+cluster://:pw%40x@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002?ttl=2h&prefix=p:&socket_timeout=0.5"
    )
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
    assert ours == {"ttl": 7200, "prefix": "p:"} and theirs == {"socket_timeout": "0.5", "password": "pw@x"}
    # nothing connects until the tier is used: an unreachable cluster still makes a tier (the engine starts)
    tier = tier_from_url("redis+cluster://:pw%40x@127.0.0.1:1,127.0.0.1:2?ttl=1h&socket_timeout=0.2", FP)
    assert isinstance(tier, RedisClusterTier) and tier.ttl == 3600 and tier.name == "redis-cluster"
    assert "pw" not in repr(tier) and tier.client.get_connection_kwargs()["password"] == "pw@x"
    assert tier.get("ab" * 32) is None and tier.stats.misses == 1 and tier.stats.errors == 1
    tier.put("ab" * 32, random_kv())  # dropped while backing off, no exception
    assert parse_cluster_url("rediss+cluster://h:1")[2] == {"ssl": True}
    with pytest.raises(ValueError, match="only database 0"):
        parse_cluster_url("redis+cluster://h:1/3")
    with pytest.raises(ValueError, match="bad node"):
        parse_cluster_url("redis+cluster://h:x")
    with pytest.raises(ValueError, match=r"bad Redis Cluster store URL redis\+cluster://u:\*\*\*@h:1"):
        tier_from_url("redis+cluster://u:secret@h:1?no_such_option=1", FP)
    with pytest.raises(ValueError, match="bad ttl"):
        tier_from_url("redis+cluster://h:1?ttl=soon", FP)


def test_entries_spread_over_nodes_and_read_back(cluster):
    tier = tier_from_url(cluster.url + "?prefix=spread:", FP)
    kvs = {f"{i:064x}": random_kv(layers=4, seed=i) for i in range(12)}
    for key, kv in kvs.items():
        tier.put(key, kv)
    nodes = {tier.node_of(tier.entry_key(key)) for key in kvs}
    assert len(nodes) == 3  # 12 keys land on all three nodes
    for key, kv in kvs.items():
        got = tier.get(key)
        assert torch.equal(got.k, kv.k) and torch.equal(got.v, kv.v)
    assert tier.stats.hits == 12 and tier.stats.writes == 12 and tier.stats.errors == 0


def test_engines_share_blocks_through_the_cluster(make_engine, cluster):
    url = cluster.url + "?prefix=share:"
    writer = make_engine(store=[url])
    handles = writer.precompute(CHUNKS)
    reference = writer.generate(prompt(handles), max_new_tokens=8, config=config("cacheblend"))
    reader = make_engine(store=["memory://?max_bytes=1GB", url])  # another engine: nothing in its memory tier
    result = reader.generate(prompt(handles), max_new_tokens=8, config=config("cacheblend"))
    assert result.token_ids == reference.token_ids
    assert result.stats.cache_hits == len(CHUNKS) and result.stats.cache_misses == 0
    tiers = reader.metrics()["store"]
    assert tiers["redis-cluster"]["hits"] == len(CHUNKS) and reader.metrics()["computed_on_miss"] == 0


def test_a_node_killed_mid_run_costs_only_its_blocks(make_engine, own_cluster):
    url = own_cluster.url + "?prefix=kill:&backoff=30"
    writer = make_engine(store=[url])
    handles = writer.precompute(CHUNKS)
    reference = writer.generate(prompt(handles), max_new_tokens=8, config=config("cacheblend"))
    tier = writer.store.tiers[0]
    victim = own_cluster.ports[1]
    lost = [h for h in handles if tier.node_of(tier.entry_key(h.key)) == f"127.0.0.1:{victim}"]
    assert 0 < len(lost) < len(handles)

    own_cluster.kill(victim)
    reader = make_engine(store=[url])
    for _ in range(3):  # the first request finds the node down; the next ones skip it (backing off)
        result = reader.generate(prompt(handles), max_new_tokens=8, config=config("cacheblend"))
        assert result.token_ids == reference.token_ids  # recomputed blocks are the same blocks: never wrong
        assert result.stats.cache_misses == len(lost) and result.stats.cache_hits == len(handles) - len(lost)
    stats = reader.metrics()["store"]["redis-cluster"]
    # the prompt's head: stored by the second request, read by the third unless it was on the killed node too
    head_hits = 1 if result.stats.head_tokens else 0
    assert stats["hits"] == 3 * (len(handles) - len(lost)) + head_hits
    assert stats["errors"] >= 1 and stats["corrupt"] == 0
    node = reader.store.tiers[0].node_health(f"127.0.0.1:{victim}")
    assert node.down and not reader.store.tiers[0].health.down  # only the lost node backs off


def test_the_shared_registry_works_over_the_cluster(make_engine, cluster):
    store = ["memory://?max_bytes=1GB", cluster.url + "?prefix=registry:"]
    writer, reader = make_engine(store=store), make_engine(store=store)
    share_registry(writer)
    share_registry(reader)
    writer.precompute(CHUNKS)
    text = writer.format_chat([{"role": "user", "content": "\n".join(CHUNKS) + "\nWhich lake is the deepest?"}])
    expected = writer.generate(prompt=text, max_new_tokens=6, config=config("cacheblend"))
    result = reader.generate(prompt=text, max_new_tokens=6, config=config("cacheblend"))  # reader's first request
    assert result.stats.cache_hits == len(CHUNKS) and result.stats.cache_misses == 0
    assert result.token_ids == expected.token_ids and reader.registry.stats()["received"] == len(CHUNKS)
