"""Layer-pipelined loading: blocks from slow tiers arrive layer by layer while the prefill runs; a read
that fails mid-way is recomputed and counted as a miss; complete reads are promoted to the memory tier."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from cacheblend_rag.store import DiskTier, KVStore, LazyChunk, MemoryTier, TierUnavailable
from cacheblend_rag.testing import flip_tensor
from tests.conftest import PASSAGES, config

from .helpers import FP, random_kv

SEGMENTS = ("Read these.\n", "\nWhich river carries the most water?")


def segments(handles):
    return [SEGMENTS[0], *handles, SEGMENTS[1]]


class Wrapped:
    """A tier whose readers can be held before a layer (``gate``), fail at one, and record what they read."""

    def __init__(self, tier, gate_layer: int | None = None, fail_layer: int | None = None) -> None:
        self.tier, self.name, self.stats = tier, tier.name, tier.stats
        self.gate_layer, self.fail_layer = gate_layer, fail_layer
        self.gate = threading.Event()
        self.reads: list[tuple[str, int]] = []

    def contains(self, key):
        return self.tier.contains(key)

    def get(self, key):
        return self.tier.get(key)

    def put(self, key, kv):
        self.tier.put(key, kv)

    def delete(self, key):
        self.tier.delete(key)

    def open(self, key):
        reader = self.tier.open(key)
        return None if reader is None else _WrappedReader(self, key, reader)


class _WrappedReader:
    def __init__(self, wrapped: Wrapped, key: str, reader) -> None:
        self.wrapped, self.key, self.reader, self.meta = wrapped, key, reader, reader.meta

    def read_layer(self, layer, out):
        if layer == self.wrapped.gate_layer:
            self.wrapped.gate.wait()
        if layer == self.wrapped.fail_layer:
            raise TierUnavailable(f"test: the device went away at layer {layer}")
        self.wrapped.reads.append((self.key, layer))
        self.reader.read_layer(layer, out)

    def close(self):
        self.reader.close()


def wait_until(condition, what: str, tries: int = 500) -> None:
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def test_fetch_gives_lazy_chunks_read_layer_major_then_promoted(tmp_path):
    memory, disk = MemoryTier(1 << 20), Wrapped(DiskTier(tmp_path, FP))
    store = KVStore([memory, disk])
    blocks = {key: random_kv(layers=4, seed=i) for i, key in enumerate(["a" * 64, "b" * 64])}
    for key, kv in blocks.items():
        store.put(key, kv)
    memory.clear()
    found = store.fetch(["a" * 64, "b" * 64, "a" * 64, "c" * 64])
    assert isinstance(found[0], LazyChunk) and found[2] is found[0] and found[3] is None
    for key, lazy in zip(blocks, found):
        got = lazy.wait()
        assert torch.equal(got.k, blocks[key].k) and torch.equal(got.v, blocks[key].v)
    assert disk.reads == [(key, layer) for layer in range(4) for key in blocks]  # layer-major
    wait_until(lambda: memory.contains("a" * 64) and memory.contains("b" * 64), "both blocks are promoted")
    assert torch.equal(store.fetch(["a" * 64])[0].k, blocks["a" * 64].k)  # now a plain memory hit
    assert disk.stats.hits == 2 and disk.stats.bytes_read == 2 * blocks["a" * 64].nbytes


def test_early_layers_are_served_before_the_block_is_read(tmp_path):
    disk = Wrapped(DiskTier(tmp_path, FP), gate_layer=2)
    store = KVStore([disk])
    kv = random_kv(layers=5)
    store.put("a" * 64, kv)
    (lazy,) = store.fetch(["a" * 64])
    k0, _ = lazy.layer(0)  # while the reader is held before layer 2
    k1, _ = lazy.layer(1)
    assert torch.equal(k0, kv.k[0]) and torch.equal(k1, kv.k[1]) and ("a" * 64, 2) not in disk.reads
    disk.gate.set()
    assert torch.equal(lazy.layer(4)[1], kv.v[4])


def test_engine_result_from_the_disk_tier_equals_the_memory_tier(make_engine):
    engine = make_engine("llama", seed=7, disk=True)
    handles = engine.precompute(PASSAGES)
    from_memory = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    memory = engine.store.tiers[0]
    memory.clear()
    from_disk = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    assert from_disk.token_ids == from_memory.token_ids and from_disk.stats.cache_hits == 3
    assert engine.store.stats()["disk"]["hits"] == 3
    wait_until(lambda: all(memory.contains(h.key) for h in handles), "the disk hits are promoted")
    memory.clear()
    engine.store.pipelined = False  # whole blocks read before the prefill: the same result
    whole = engine.generate(segments(handles), max_new_tokens=6, config=config("full_reuse"))
    engine.store.pipelined = True
    memory.clear()
    lazy = engine.generate(segments(handles), max_new_tokens=6, config=config("full_reuse"))
    assert whole.token_ids == lazy.token_ids and lazy.stats.cache_hits == 3


@pytest.mark.parametrize("failure", ["checksum of layer 2", "device gone at layer 2", "layer 2 too slow"])
def test_a_read_failing_midway_is_recomputed_and_counted_as_a_miss(make_engine, caplog, failure):
    engine = make_engine("llama", seed=8, disk=True)
    handles = engine.precompute(PASSAGES)
    reference = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    memory, disk = engine.store.tiers
    wrapped = None
    if failure == "checksum of layer 2":
        flip_tensor(disk, handles[1].key, "v.2")
    else:
        wrapped = Wrapped(disk, fail_layer=2) if failure.startswith("device") else Wrapped(disk, gate_layer=2)
        engine.store.tiers[1] = wrapped
        engine.store.layer_timeout_s = 0.5
    memory.delete(handles[1].key)  # the other two chunks are memory hits
    computed = engine.metrics()["computed_on_miss"]
    with caplog.at_level(logging.WARNING):
        result = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    if wrapped is not None:
        wrapped.gate.set()  # let a held reader finish
    assert result.token_ids == reference.token_ids
    assert result.stats.cache_misses == 1 and result.stats.cache_hits == 2
    assert engine.metrics()["computed_on_miss"] == computed + 1
    if failure == "checksum of layer 2":
        assert "unusable" in caplog.text and disk.stats.corrupt == 1
        fresh = disk.get(handles[1].key)  # the bad file was deleted, then written again from the recompute
        assert fresh is not None and torch.equal(
            fresh.v, engine.compute_chunk(handles[1].token_ids, handles[1].context_ids).v
        )
    elif failure == "layer 2 too slow":
        assert "too slow" in caplog.text
    assert engine.store.tiers[1].contains(handles[1].key)


def test_int8_store_serves_the_same_values_from_every_tier_in_half_the_bytes(tmp_path, make_engine):
    fp16_disk, int8_disk = DiskTier(tmp_path / "f16", FP), DiskTier(tmp_path / "i8", FP)
    kv = random_kv(tokens=200, layers=4, heads=2, dim=64, dtype=torch.float32)
    KVStore([fp16_disk]).put("a" * 64, kv)
    memory = MemoryTier(1 << 30)
    stored = KVStore([memory, int8_disk], dtype=torch.int8).put("a" * 64, kv)
    ratio = int8_disk.usage()["bytes"] / fp16_disk.usage()["bytes"]
    assert 0.5 < ratio < 0.56, ratio  # int8 values plus float32 scales per key channel and per value token
    (lazy,) = KVStore([int8_disk], dtype=torch.int8).fetch(["a" * 64])
    from_disk = lazy.wait()
    assert from_disk.k.dtype == torch.float16 and torch.equal(from_disk.k, stored.k)
    assert torch.equal(from_disk.v, stored.v) and torch.equal(memory.get("a" * 64).k, stored.k)
    assert memory.nbytes == stored.k.nbytes * 2  # the memory tier holds the decoded tensors only
    engine = make_engine("llama", seed=9, disk=True, store_dtype=torch.int8)
    handles = engine.precompute(PASSAGES)
    hot = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    engine.store.tiers[0].clear()
    cold = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    assert cold.token_ids == hot.token_ids and cold.stats.cache_hits == 3
