"""Concurrency: threads sharing one engine, processes sharing the disk and Redis tiers, writers killed
mid-way, and the memory tier's byte budget under concurrent use."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cacheblend_rag.store import ChunkKV, DiskTier, MemoryTier
from tests.conftest import PASSAGES, config

from .helpers import FP, REPO, random_kv

MORE = [
    *PASSAGES,
    "The Nile is usually called the longest river, flowing north through eleven countries to the Mediterranean.",
    "Lake Baikal in Siberia is the deepest lake in the world and holds a fifth of its unfrozen fresh water.",
    "The Atacama desert in Chile is among the driest places on Earth; some stations have never recorded rain.",
]
STRATEGIES = ("cacheblend", "full_reuse", "prefix_cache")


def requests_pool(handles, n: int = 24, seed: int = 0) -> list[tuple[list, str]]:
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        chunks = rng.sample(handles, rng.randint(2, 4))
        pool.append((["Passages:\n", *chunks, f"\nQuestion {i}: which is the largest?"], STRATEGIES[i % 3]))
    return pool


def test_threads_share_one_engine(make_engine):
    """8 threads x 20 requests over shared chunks, with a memory tier too small for them (evictions, disk
    reads, promotions): every result equals the same request run alone; nothing raises."""
    engine = make_engine("llama", seed=10, disk=True)
    handles = engine.precompute(MORE)
    pool = requests_pool(handles)
    alone = [engine.generate(segs, max_new_tokens=4, config=config(s)).token_ids for segs, s in pool]
    one_chunk = engine.store.get(handles[0].key).nbytes
    memory = MemoryTier(max_bytes=3 * one_chunk)
    engine.store.tiers[0] = memory
    errors: list[BaseException] = []
    mismatches: list[int] = []
    over_budget: list[int] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            if memory.nbytes > memory.max_bytes:
                over_budget.append(memory.nbytes)
            time.sleep(0.001)

    def work(thread: int):
        rng = random.Random(thread)
        try:
            for _ in range(20):
                i = rng.randrange(len(pool))
                segs, strategy = pool[i]
                result = engine.generate(segs, max_new_tokens=4, config=config(strategy))
                if result.token_ids != alone[i]:
                    mismatches.append(i)
        except BaseException as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors[0]
    assert not mismatches, f"requests {sorted(set(mismatches))} differ from their results alone"
    assert not over_budget and memory.nbytes <= memory.max_bytes
    metrics = engine.metrics()
    assert metrics["requests"] == len(pool) + 160
    assert metrics["store"]["memory"]["evictions"] > 0 and metrics["store"]["disk"]["hits"] > 0


def test_concurrent_misses_on_one_chunk_compute_it_once(make_engine):
    engine = make_engine("llama", seed=11)
    handle = engine.handle(PASSAGES[0])
    barrier = threading.Barrier(6)
    results: list[ChunkKV] = []

    def fetch():
        barrier.wait()
        results.append(engine.chunk_kv(handle)[0])

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(torch.equal(r.k, results[0].k) for r in results)
    assert engine.metrics()["computed_on_miss"] <= 2  # one, unless a thread arrived after it was stored


HAMMER = """
import json, random, sys, torch
from cacheblend_rag.store import ChunkKV, ChunkReadError, KVStore, LazyChunk, tier_from_url
url, writer, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tier = tier_from_url(url, "f" * 64)
store = KVStore([tier], dtype=torch.float16)
keys = [f"{i:02d}" * 32 for i in range(4)]

def block(key, variant):  # two processes computing one chunk may round differently: variants of one key
    gen = torch.Generator().manual_seed(int(key[:2]) * 10 + variant)
    return ChunkKV(torch.randn(6, 2, 64, 32, generator=gen).half(), torch.randn(6, 2, 64, 32, generator=gen).half())

expected = {(k, w): block(k, w) for k in keys for w in (0, 1)}
rng = random.Random(writer)
counts = {"put": 0, "delete": 0, "hit": 0, "miss": 0}
for _ in range(n):
    key, roll = rng.choice(keys), rng.random()
    if roll < 0.35:
        tier.put(key, expected[(key, writer)]); counts["put"] += 1
    elif roll < 0.45:
        tier.delete(key); counts["delete"] += 1
    else:
        got = store.fetch([key])[0] if roll < 0.75 else tier.get(key)
        if isinstance(got, LazyChunk):
            try:
                got = got.wait()
            except ChunkReadError:  # the read failed (replaced or deleted meanwhile): a miss, never a mix
                got = None
        if got is None:
            counts["miss"] += 1
            continue
        ok = [w for w in (0, 1) if torch.equal(got.k, expected[key, w].k) and torch.equal(got.v, expected[key, w].v)]
        assert ok, f"{key[:4]}: a block that is neither variant (mixed layers or corrupt) was served"
        counts["hit"] += 1
print(json.dumps(counts))
"""


def _hammer(url: str, n: int = 150) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, url, str(w), str(n)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (0, 1)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_processes_sharing_the_disk_tier_never_see_mixed_or_partial_blocks(tmp_path):
    outs = _hammer(f"file://{tmp_path / 'kv'}")
    assert all(o["hit"] > 10 and o["put"] > 10 for o in outs), outs


def test_processes_sharing_redis_never_see_mixed_or_partial_blocks(redis_url):
    outs = _hammer(redis_url)
    assert all(o["hit"] > 10 and o["put"] > 10 for o in outs), outs


WRITER = """
import os, signal, sys, torch
from safetensors.torch import save_file
from cacheblend_rag.store import ChunkKV, DiskTier, disk
root, point = sys.argv[1], sys.argv[2]
tier = DiskTier(root, "f" * 64)
x = (torch.arange(8 * 4 * 256 * 64) % 1999).half().view(8, 4, 256, 64)
tier.put("aa" * 32, ChunkKV(x, -x))  # version 1, complete

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def half_written(tensors, path, metadata):  # the kill lands in the middle of writing the file's bytes
    save_file(tensors, root + ".full", metadata=metadata)
    data = open(root + ".full", "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        die()

def not_renamed(src, dst):  # the file is complete but the kill comes before os.replace
    die()

if point == "mid-write":
    disk.save_file = half_written
else:
    disk.os.replace = not_renamed
tier.put("aa" * 32, ChunkKV(x + 1, -x))  # version 2 of an existing entry: killed
"""


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_disk_writer_killed_mid_write_leaves_nothing_that_is_served(tmp_path, point):
    """A writer killed by SIGKILL mid-way through replacing an entry (while writing its bytes, or before the
    rename): the old entry is still served, whole; the leftover temporary file is never served."""
    root = tmp_path / "kv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WRITER, str(root), point], cwd=REPO, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(root.glob("??/.tmp-*"))
    assert [p.name.startswith(".tmp-aaaa") for p in leftovers] == [True]  # the killed write's file
    tier = DiskTier(root, FP)
    assert [p.name for p in tier.files()] == ["aa" * 32 + ".safetensors"]
    got = tier.get("aa" * 32)
    x = (torch.arange(8 * 4 * 256 * 64) % 1999).half().view(8, 4, 256, 64)
    assert got is not None and torch.equal(got.k, x) and torch.equal(got.v, -x)  # version 1, not a mix
    assert tier.stats.corrupt == 0


def test_memory_tier_never_exceeds_its_budget_under_concurrent_use():
    sizes = [random_kv(tokens=t, seed=t) for t in (3, 10, 30, 60, 200)]
    budget = sizes[3].nbytes * 2 + sizes[1].nbytes
    tier = MemoryTier(max_bytes=budget)
    observed: list[int] = []
    stop = threading.Event()

    def churn(seed: int):
        rng = random.Random(seed)
        for _ in range(3000):
            key = f"k{rng.randrange(12)}"
            if rng.random() < 0.6:
                tier.put(key, rng.choice(sizes))
            elif rng.random() < 0.8:
                tier.get(key)
            else:
                tier.delete(key)

    def watch():
        while not stop.is_set():
            observed.append(tier.nbytes)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=churn, args=(s,)) for s in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    assert max(observed) <= budget and tier.nbytes <= budget
    assert tier.nbytes == sum(kv.nbytes for kv in tier._items.values())
    assert tier.stats.evictions > 0
    tier.put("huge", random_kv(tokens=5000))  # larger than the whole budget: not kept
    assert not tier.contains("huge") and tier.nbytes <= budget


@pytest.mark.parametrize("n_threads", [4])
def test_disk_tier_reads_and_writes_from_threads(tmp_path, n_threads):
    tier = DiskTier(tmp_path, FP)
    blocks = {f"{i:02d}" * 32: random_kv(tokens=50, layers=4, seed=i) for i in range(4)}
    errors: list[str] = []

    def work(seed: int):
        rng = random.Random(seed)
        for _ in range(60):
            key = rng.choice(list(blocks))
            if rng.random() < 0.4:
                tier.put(key, blocks[key])
            else:
                got = tier.get(key)
                if got is not None and not torch.equal(got.k, blocks[key].k):
                    errors.append(key)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and tier.stats.corrupt == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(f"{k}.safetensors" for k in blocks)


def test_tier_stats_add_loses_no_count_under_threads():
    """Every tier counts through TierStats.add, from request threads and loader threads at once."""
    from cacheblend_rag.store.tier import TierStats

    stats = TierStats()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: an unlocked read-add-write loses counts
    try:
        threads = [
            threading.Thread(target=lambda: [stats.add(hits=1, bytes_read=3) for _ in range(20_000)]) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert stats.snapshot() == {**TierStats().snapshot(), "hits": 80_000, "bytes_read": 240_000}
