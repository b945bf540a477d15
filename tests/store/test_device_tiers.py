"""The device and pinned memory tiers (store/memory.py): URLs, budgets, promotion and eviction between tiers.

Without a GPU the device tier is exercised on torch's ``meta`` device (tensors with shapes and no storage): the
budget, LRU and promotion logic are the same code a CUDA device tier runs. The CUDA-only tests check pinning and
the layer-by-layer side-stream copy for real.
"""

import time

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.store import ChunkKV, DiskTier, KVStore, MemoryTier, tier_from_url
from cacheblend_rag.store.memory import pinned_bytes
from tests.conftest import PASSAGES, config

FP = "f" * 64
CUDA = torch.cuda.is_available()


def random_kv(tokens=7, seed=0, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 2, tokens, 8)
    return ChunkKV(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))


def test_memory_urls_take_device_and_pin():
    plain = tier_from_url("memory://?max_bytes=1MB&device=cpu", FP)
    assert plain.device is None and plain.name == "memory" and plain.max_bytes == 10**6
    pinned = tier_from_url("memory://?pin=1&max_bytes=1MB", FP)
    assert pinned.name == "pinned" and pinned.pin == CUDA  # pinning only means something with CUDA
    with pytest.raises(ValueError, match="unknown memory tier option"):
        tier_from_url("memory://?max_byte=1MB", FP)
    with pytest.raises(ValueError, match="pin must be 1 or 0"):
        tier_from_url("memory://?pin=maybe", FP)


@pytest.mark.skipif(CUDA, reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("url", ["memory://?device=cuda&max_bytes=1GB", "gpu://", "memory://?device=cuda:1"])
def test_a_cuda_tier_without_cuda_names_the_fix(url):
    with pytest.raises(ValueError, match=r"needs CUDA.*drop device="):
        tier_from_url(url, FP)


def test_device_tier_holds_entries_on_its_device_within_its_budget():
    one = random_kv().nbytes
    dev = MemoryTier(2 * one, device="meta")
    assert dev.name == "device" and dev.device == torch.device("meta")
    for i in range(3):
        dev.put(f"k{i}", random_kv(seed=i))
    assert [dev.contains(f"k{i}") for i in range(3)] == [False, True, True]
    assert dev.get("k2").k.device.type == "meta" and dev.nbytes == 2 * one and dev.stats.evictions == 1
    dev.put("huge", random_kv(tokens=100))  # larger than the budget: not kept, nothing evicted for it
    assert not dev.contains("huge") and len(dev) == 2


def test_promotion_into_the_device_tier_keeps_every_budget(tmp_path):
    one = random_kv().nbytes
    dev, host, disk = MemoryTier(2 * one, device="meta"), MemoryTier(3 * one, pin=True), DiskTier(tmp_path, FP)
    store = KVStore([dev, host, disk], dtype=torch.float16)
    stored = [store.put(f"k{i}", random_kv(seed=i)) for i in range(5)]
    assert all(kv.k.device.type == "cpu" for kv in stored)  # computed on the CPU: the host form comes back
    assert [dev.contains(f"k{i}") for i in range(5)] == [False, False, False, True, True]
    assert [host.contains(f"k{i}") for i in range(5)] == [False, False, True, True, True]
    got = store.get("k0")  # only on disk: promoted into the host tier and the device tier, each evicting its LRU
    assert torch.equal(got.k, stored[0].k)
    assert dev.contains("k0") and dev.get("k0").k.device.type == "meta" and not dev.contains("k3")
    assert host.contains("k0") and not host.contains("k2")
    assert dev.nbytes <= 2 * one and host.nbytes <= 3 * one
    assert store.stats()["disk"]["hits"] == 1 and store.stats()["device"]["evictions"] == 4
    store.fetch(["k2"])  # the pipelined read promotes too, once the block is in (device tier first, then host)
    for _ in range(500):
        if dev.contains("k2") and host.contains("k2"):
            break
        time.sleep(0.01)
    assert dev.contains("k2") and host.contains("k2") and dev.nbytes <= 2 * one


def test_a_pinned_tier_budgets_the_page_locked_memory_it_takes():
    """torch's caching host allocator rounds each pinned block up to a power of two: a pinned tier counts that."""
    assert [pinned_bytes(n) for n in (0, 1, 480, 4096, 4097)] == [0, 1, 512, 4096, 8192]
    tier = MemoryTier(2900)
    tier.pin = True  # what MemoryTier(pin=True) is where CUDA is; a CPU-only torch cannot pin, so
    tier._placed = lambda kv: kv  # the entries stay as they are (the budget logic is what is tested)
    for i in range(3):
        tier.put(f"k{i}", random_kv(tokens=5, seed=i))  # 480 bytes per tensor: 512 once pinned
    assert len(tier) == 2 and tier.nbytes == 2048 and tier.stats.evictions == 1  # 3 x 960 would have "fit"
    tier.delete("k2")
    assert tier.nbytes == 1024


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the device tier and pinned memory are CUDA's")
def test_cuda_tiers_and_the_side_stream_copy_give_the_host_results(make_engine):
    from tests.conftest import tiny_model

    model = tiny_model("llama", seed=3).to("cuda")
    results = {}
    for tier in ("memory://?max_bytes=1GB", "memory://?pin=1&max_bytes=1GB", "memory://?device=cuda&max_bytes=1GB"):
        engine = make_engine("llama", model=model, store=[tier])
        handles = engine.precompute(PASSAGES)
        kv = engine.store.tiers[0].get(handles[0].key)
        if "pin" in tier:
            assert kv.k.is_pinned()
        if "device" in tier:
            assert kv.k.is_cuda
        results[tier] = engine.prepare(["Read.\n", *handles, "\nWhich river?"], config=config("full_reuse")).logits
    first, *rest = results.values()
    for logits in rest:
        assert_close(logits, first, atol=1e-5, rtol=1e-5)
