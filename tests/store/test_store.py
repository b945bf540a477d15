"""Store: exact round trips, key sensitivity, LRU by bytes, corrupt files are misses, concurrent writers."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from cacheblend_rag.store import ChunkKV, DiskTier, KVStore, MemoryTier, chain_key, parse_bytes, tier_from_url
from tests.conftest import PASSAGES, config, tiny_model

FP = "f" * 64


def random_kv(tokens=7, layers=3, heads=2, dim=8, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randn(layers, heads, tokens, dim, generator=gen).to(dtype),
        torch.randn(layers, heads, tokens, dim, generator=gen).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_disk_round_trip_is_exact(tmp_path, dtype):
    tier = DiskTier(tmp_path, FP)
    kv = random_kv(dtype=dtype)
    tier.put("ab" * 32, kv)
    back = tier.get("ab" * 32)
    assert back.k.dtype == dtype and torch.equal(back.k, kv.k) and torch.equal(back.v, kv.v)


def test_store_promotes_and_casts(tmp_path):
    mem, disk = MemoryTier(1 << 20), DiskTier(tmp_path, FP)
    store = KVStore([mem, disk], dtype=torch.float16)
    kv = random_kv(dtype=torch.float32)
    stored = store.put("k1", kv)
    assert stored.k.dtype == torch.float16
    mem.clear()
    got = store.get("k1")
    assert torch.equal(got.k, stored.k) and mem.contains("k1")
    assert store.stats()["disk"]["hits"] == 1 and store.stats()["memory"]["misses"] == 1


def test_float16_overflow_falls_back_to_bfloat16():
    store = KVStore([MemoryTier()], dtype=torch.float16)
    kv = random_kv(dtype=torch.float32)
    kv.v[0, 0, 0, 0] = 1e6
    assert store.put("big", kv).k.dtype == torch.bfloat16


def test_memory_tier_lru_by_bytes():
    one = random_kv().nbytes
    tier = MemoryTier(max_bytes=3 * one)
    for i in range(3):
        tier.put(f"k{i}", random_kv(seed=i))
    tier.get("k0")  # k0 becomes most recent, k1 is now least recent
    tier.put("k3", random_kv(seed=3))
    assert [tier.contains(f"k{i}") for i in range(4)] == [True, False, True, True]
    assert tier.nbytes <= 3 * one and tier.stats.evictions == 1
    tier.put("huge", random_kv(tokens=100))
    assert not tier.contains("huge") and tier.nbytes <= 3 * one


def test_chain_keys_are_sensitive_to_everything():
    base = chain_key(FP, None, [1, 2, 3])
    assert base != chain_key("e" * 64, None, [1, 2, 3])
    assert base != chain_key(FP, "parent", [1, 2, 3])
    assert base != chain_key(FP, None, [1, 2, 4])
    assert base != chain_key(FP, None, [1, 2, 3, 0])
    assert base == chain_key(FP, None, (1, 2, 3))


def test_engine_keys_change_with_weights_tokenizer_and_prefix(make_engine, tokenizer):
    a = make_engine("llama", seed=0)
    b = make_engine("llama", seed=1)
    c = make_engine("llama", seed=0, chunk_prefix="Context:")
    q = make_engine("qwen2", seed=0)
    keys = {e.handle(PASSAGES[0]).key for e in (a, b, c, q)}
    assert len(keys) == 4
    assert a.handle(PASSAGES[0]).key == make_engine("llama", seed=0).handle(PASSAGES[0]).key
    from transformers import AutoTokenizer

    other_tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other_tok.add_tokens(["<extra_token>"])
    d = make_engine(model=tiny_model("llama", seed=0))
    d2 = type(d)(d.model, other_tok, store=["memory://"])
    assert d2.fingerprint != d.fingerprint


def _corrupt_variants(path):
    data = path.read_bytes()
    yield "truncated", data[: len(data) // 2]
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    yield "bit flip in the last tensor", bytes(flipped)
    yield "garbage", b"\x00not a safetensors file" * 10
    yield "empty", b""


@pytest.mark.parametrize("variant", ["truncated", "bit flip in the last tensor", "garbage", "empty"])
def test_corrupt_file_is_a_miss_and_gets_rewritten(make_engine, tmp_path, caplog, variant):
    engine = make_engine("llama", seed=2, disk=True)
    handles = engine.precompute(PASSAGES)
    segments = ["Read.\n", *handles, "\nQ?"]
    clean = engine.generate(segments, max_new_tokens=6, config=config("cacheblend"))
    disk = engine.store.tiers[1]
    path = disk.path(handles[1].key)
    bad = dict(_corrupt_variants(path))[variant]
    path.write_bytes(bad)
    engine.store.tiers[0].clear()
    with caplog.at_level(logging.WARNING):
        again = engine.generate(segments, max_new_tokens=6, config=config("cacheblend"))
    assert again.token_ids == clean.token_ids
    assert again.stats.cache_misses == 1 and again.stats.cache_hits == 2
    assert "unusable" in caplog.text
    assert disk.get(handles[1].key) is not None  # rewritten


def test_file_from_another_model_is_a_miss(tmp_path):
    DiskTier(tmp_path, "a" * 64).put("k" * 64, random_kv())
    assert DiskTier(tmp_path, "b" * 64).get("k" * 64) is None
    # and a file copied under another key is rejected too
    tier = DiskTier(tmp_path, "a" * 64)
    tier.put("k" * 64, random_kv())
    tier.path("j" * 64).parent.mkdir(parents=True, exist_ok=True)
    tier.path("j" * 64).write_bytes(tier.path("k" * 64).read_bytes())
    assert tier.get("j" * 64) is None and tier.stats.corrupt == 1


def test_store_rejects_wrong_geometry(tmp_path):
    store = KVStore([DiskTier(tmp_path, FP)], expect=(3, 2, 8))
    store.tiers[0].put("x", random_kv(layers=2))
    assert store.get("x") is None


def test_two_processes_writing_the_same_chunk_leave_one_valid_file(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from cacheblend_rag.store import ChunkKV, DiskTier
        tier = DiskTier({str(tmp_path)!r}, {FP!r})
        gen = torch.Generator().manual_seed(0)
        kv = ChunkKV(torch.randn(4, 2, 300, 16, generator=gen).half(), torch.randn(4, 2, 300, 16, generator=gen).half())
        for _ in range(40):
            tier.put("cd" * 32, kv)
            got = tier.get("cd" * 32)
            assert got is not None and torch.equal(got.k, kv.k), "read a bad entry"
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    tier = DiskTier(tmp_path, FP)
    assert tier.get("cd" * 32) is not None
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["cd" * 32 + ".safetensors"]


def test_gc_trims_to_budget(tmp_path):
    tier = DiskTier(tmp_path, FP)
    for i in range(5):
        tier.put(f"{i:02d}" * 32, random_kv(seed=i))
    one = tier.usage()["bytes"] // 5
    result = tier.gc(max_bytes=2 * one + one // 2)
    assert tier.usage()["entries"] == 2 and result["removed"] == 3


def test_urls_and_sizes(tmp_path):
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(10) == 10
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes("lots")
    assert isinstance(tier_from_url("memory://?max_bytes=1MB", FP), MemoryTier)
    assert tier_from_url(f"file://{tmp_path}", FP).root == tmp_path
    with pytest.raises(ValueError, match="unknown store URL"):
        tier_from_url("s3://bucket", FP)


def test_model_fingerprint_is_the_same_for_every_thread_count():
    """Float sums round differently with the reduction's thread split (1, 2 and 3 threads gave 3 different
    fingerprints before): processes configured differently must still share one key space."""
    from cacheblend_rag.store.keys import weights_fingerprint

    model = tiny_model("llama", seed=0)
    before = torch.get_num_threads()
    try:
        prints = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            prints.add(weights_fingerprint(model))
    finally:
        torch.set_num_threads(before)
    assert len(prints) == 1
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3  # any change to a weight changes it
    assert weights_fingerprint(model) not in prints


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
def test_tensor_crc_is_zlibs_crc32_whichever_library_computes_it(dtype):
    """Entries written with ISA-L's CRC32 must verify with zlib's and the other way round."""
    import zlib

    from cacheblend_rag.store.entry import tensor_crc

    for n in (0, 1, 7, 4099):
        t = (torch.randn(n) * 50).to(dtype)
        assert tensor_crc(t) == zlib.crc32(
            t.numpy().tobytes() if dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        )
