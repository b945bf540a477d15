"""The store under hostile conditions: full and read-only disks, files vanishing or replaced by odd things,
entries of the wrong token count, a redis:// URL that reaches another service."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cacheblend_rag.store import DiskTier, KVStore, MemoryTier, tier_from_url
from cacheblend_rag.store.entry import EntryMeta
from tests.conftest import PASSAGES, config

from .helpers import FP, random_kv

SEGMENTS_HEAD, SEGMENTS_TAIL = "Read.\n", "\nQuestion: which river?"
BIG = [" ".join(PASSAGES * 6) + f" ({i})" for i in range(3)]  # ~400 tokens each: ~0.4 MB of float32 KV each


def segments(handles):
    return [SEGMENTS_HEAD, *handles, SEGMENTS_TAIL]


def write_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "could not write KV cache file" in r.getMessage()]


@contextlib.contextmanager
def mounted(*commands: list[str], target: Path):
    """Run mount ``commands`` (skipping the test, with the reason, where mounting is not allowed); unmount after."""
    target.mkdir(parents=True, exist_ok=True)
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip(
                f"cannot mount here ({' '.join(command)}: {proc.stderr.strip()}); needs root or "
                "CAP_SYS_ADMIN. test_disk_write_errors_without_a_mount covers this without a mount"
            )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


# ---- a full or read-only disk tier -------------------------------------------------------------------------------
def test_full_disk_tier_skips_writes_and_requests_succeed(make_engine, tmp_path, caplog):
    """A 1 MB tmpfs as the only tier: safetensors raises SafetensorError("No space left on device")."""
    with mounted(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path / "full")], target=tmp_path / "full"):
        engine = make_engine("llama", seed=4, store=[f"file://{tmp_path / 'full'}"])
        reference = make_engine("llama", seed=4)
        with caplog.at_level(logging.WARNING):
            for _ in range(2):  # every retry succeeds too
                handles = engine.precompute(BIG)
                result = engine.generate(segments(handles), max_new_tokens=4, config=config("cacheblend"))
        ref_handles = reference.precompute(BIG)
        expected = reference.generate(segments(ref_handles), max_new_tokens=4, config=config("cacheblend"))
        assert result.token_ids == expected.token_ids
        disk = engine.store.tiers[0]
        # the chunks and the prompt's head (engine/strategies/reuse.py): some of those blocks were never written
        assert disk.stats.errors >= 2 and 1 <= disk.stats.writes < len(BIG) + 1
        assert len(write_warnings(caplog)) == 1  # rate-limited: one warning for every failed write
        assert "No space left on device" in write_warnings(caplog)[0]
        assert not list((tmp_path / "full").glob("??/.tmp-*"))  # no partial file left behind


def test_read_only_disk_tier_serves_what_it_has_and_skips_writes(make_engine, tmp_path, caplog):
    """A populated store bind-mounted read-only: reads hit, writes fail with "Read-only file system"."""
    source = tmp_path / "kv"
    writer = make_engine("llama", seed=5, store=[f"file://{source}"])
    old = writer.precompute(PASSAGES[:2])
    for i in range(256):  # every key folder exists, so the write itself (not mkdir) is what fails
        (source / f"{i:02x}").mkdir(exist_ok=True)
    ro = tmp_path / "ro"
    with mounted(["mount", "--bind", str(source), str(ro)], ["mount", "-o", "remount,ro,bind", str(ro)], target=ro):
        engine = make_engine("llama", seed=5, store=[f"file://{ro}"])
        with caplog.at_level(logging.WARNING):
            new = engine.precompute(PASSAGES[2:])
            result = engine.generate(segments([*old, *new]), max_new_tokens=4, config=config("cacheblend"))
            again = engine.generate(segments([*old, *new]), max_new_tokens=4, config=config("cacheblend"))
        disk = engine.store.tiers[0]
        assert result.stats.cache_hits == 2 and again.token_ids == result.token_ids
        assert disk.stats.errors >= 2 and disk.stats.writes == 0
        [warning] = write_warnings(caplog)
        assert "Read-only file system" in warning


def test_disk_write_errors_without_a_mount(tmp_path, caplog):
    """The same failure without mounting anything: a file size limit (RLIMIT_FSIZE) makes the write fail with a
    real SafetensorError ("File too large"), which the tier skips and counts."""
    tier = DiskTier(tmp_path / "kv", FP)
    kv = random_kv(tokens=200, layers=3, dtype=torch.float32)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else exceeding the limit kills the process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with caplog.at_level(logging.WARNING):
            for i in range(3):
                tier.put(f"{i}" * 64, kv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert tier.stats.errors == 3 and tier.stats.writes == 0 and tier.usage()["entries"] == 0
    [warning] = write_warnings(caplog)
    assert "SafetensorError" in warning and "File too large" in warning
    tier.put("a" * 64, kv)  # the limit lifted: writes work again
    assert tier.stats.writes == 1 and torch.equal(tier.get("a" * 64).k, kv.k)


# ---- a file removed right after it was written -------------------------------------------------------------------
def test_file_deleted_right_after_the_replace_does_not_fail_the_put(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path / "kv", FP)
    real_replace = os.replace

    def replace_then_cleaner(src, dst):  # another process's `store gc` runs between the replace and a stat
        real_replace(src, dst)
        os.unlink(dst)

    monkeypatch.setattr(os, "replace", replace_then_cleaner)
    tier.put("c" * 64, random_kv())
    assert tier.stats.writes == 1 and tier.stats.bytes_written > 0 and tier.get("c" * 64) is None


def test_puts_against_a_concurrent_deleter(tmp_path):
    """Another process deleting every KV file as fast as it can while this one writes (the probe's race)."""
    tier = DiskTier(tmp_path / "kv", FP)
    kv = random_kv(tokens=4, layers=2)
    tier.put("0" * 64, kv)
    deleter = subprocess.Popen([sys.executable, "-c", DELETER, str(tier.root)])
    try:
        for i in range(1000):
            tier.put(f"{i % 4}{i:063d}", kv)
    finally:
        deleter.kill()
        deleter.wait()
    assert tier.stats.writes == 1001 and tier.stats.errors == 0


DELETER = """
import os, sys
root = sys.argv[1]
while True:
    for d in os.listdir(root):
        for f in os.listdir(os.path.join(root, d)) if len(d) == 2 else ():
            if f.endswith(".safetensors"):
                try:
                    os.unlink(os.path.join(root, d, f))
                except FileNotFoundError:
                    pass
"""


# ---- an entry whose token count is not the handle's --------------------------------------------------------------
def _consistent_wrong_count(engine, tier, handles):
    """A valid, checksummed entry of another chunk (another token count) under handles[1]'s key."""
    tier.delete(handles[1].key)
    tier.put(handles[1].key, engine.store.encode(engine.compute_chunk((*handles[0].token_ids, 13))))


@pytest.mark.parametrize("where", ["memory", "disk", "redis"])
def test_entry_with_a_wrong_token_count_is_a_miss_and_deleted(make_engine, tmp_path, where, request, caplog):
    stores = {
        "memory": lambda: ["memory://?max_bytes=1GB"],
        "disk": lambda: [f"file://{tmp_path / 'kv'}"],
        "redis": lambda: [request.getfixturevalue("redis_url")],
    }
    engine = make_engine("llama", seed=6, store=stores[where]())
    tier = engine.store.tiers[0]
    handles = engine.precompute(PASSAGES)
    clean = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    _consistent_wrong_count(engine, tier, handles)
    assert tier.get(handles[1].key).n_tokens == handles[0].n_tokens + 1 != handles[1].n_tokens
    with caplog.at_level(logging.WARNING):
        again = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    assert again.token_ids == clean.token_ids and again.stats.cache_misses == 1 and tier.stats.corrupt == 1
    assert "expected (layers, kv heads, tokens, head dim)" in caplog.text
    assert tier.get(handles[1].key).n_tokens == handles[1].n_tokens  # deleted, then rewritten by the recompute
    _consistent_wrong_count(engine, tier, handles)
    kv, hit = engine.chunk_kv(handles[1])  # the whole-entry read path checks the count too
    assert not hit and kv.n_tokens == handles[1].n_tokens


def test_redis_entry_with_an_absurd_token_count_is_deleted(make_engine, redis_url):
    engine = make_engine("llama", seed=6, store=[redis_url])
    tier = engine.store.tiers[0]
    handles = engine.precompute(PASSAGES)
    clean = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    rkey = tier.entry_key(handles[1].key)
    meta = EntryMeta.parse(json.loads(tier.client.hget(rkey, "meta")), handles[1].key, tier.model_fingerprint)
    layers, heads, _, dim = meta.shape
    absurd = EntryMeta(meta.key, meta.model_fingerprint, (layers, heads, 10**9, dim), meta.dtype, meta.codec, meta.crc)
    tier.client.hset(rkey, "meta", json.dumps(absurd.to_strings()))  # checksums of the real tensors
    for _ in range(2):  # the entry is deleted at the first request, so the second one is a plain miss
        again = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
        assert again.token_ids == clean.token_ids
    assert tier.stats.corrupt == 1 and tier.get(handles[1].key).n_tokens == handles[1].n_tokens


def test_store_get_checks_the_token_count_on_every_tier(tmp_path):
    kv = random_kv(tokens=7)
    for tier in (MemoryTier(1 << 20), DiskTier(tmp_path / "kv", FP)):
        store = KVStore([tier], expect=(3, 2, 8))
        store.put("e" * 64, kv)
        assert store.get("e" * 64, n_tokens=7) is not None
        assert store.get("e" * 64, n_tokens=8) is None and tier.stats.corrupt == 1
        assert store.get("e" * 64) is None  # deleted
        store.put("e" * 64, kv)
        assert store.fetch(["e" * 64], [6]) == [None] and store.fetch(["e" * 64]) == [None]


# ---- a redis:// URL that reaches a service which is not Redis ----------------------------------------------------
@pytest.fixture
def not_redis():
    """A TCP service on loopback that answers every request with an HTTP error (garbage to a Redis client)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn):
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while not stop.is_set() and conn.recv(65536):
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    server.close()


def test_redis_url_reaching_another_service_means_tier_unavailable(make_engine, not_redis, caplog):
    engine = make_engine("llama", seed=7, store=["memory://?max_bytes=1GB", not_redis])
    reference = make_engine("llama", seed=7)
    with caplog.at_level(logging.WARNING):
        handles = engine.precompute(PASSAGES)
        engine.store.tiers[0].clear()  # the next request goes to the "Redis" tier for every chunk
        result = engine.generate(segments(handles), max_new_tokens=6, config=config("cacheblend"))
    expected = reference.generate(segments(reference.precompute(PASSAGES)), max_new_tokens=6)
    assert result.token_ids == expected.token_ids
    redis = engine.store.tiers[1]
    assert redis.stats.errors >= 1 and redis.health.down
    assert "is unavailable (InvalidResponse" in caplog.text
    tier = tier_from_url(not_redis + "?backoff=0", FP)
    assert tier.get("a" * 64) is None and not tier.contains("a" * 64)
    tier.put("a" * 64, random_kv())
    tier.delete("a" * 64)
    assert tier.stats.errors >= 4


# ---- store scans with dangling symlinks, vanishing files, FIFOs --------------------------------------------------
def _populated(tmp_path, n=3) -> DiskTier:
    tier = DiskTier(tmp_path / "kv", FP)
    for i in range(n):
        tier.put(f"{i}" * 64, random_kv(seed=i))
    return tier


def test_scans_skip_dangling_symlinks_and_files_that_vanish(tmp_path, monkeypatch):
    from cacheblend_rag.cli import app

    tier = _populated(tmp_path)
    (tier.root / "dd").mkdir()
    (tier.root / "dd" / ("d" * 64 + ".safetensors")).symlink_to(tmp_path / "nowhere")
    one = tier.usage()
    assert one["entries"] == 3
    listed = DiskTier.files

    def files_then_one_vanishes(self):
        found = listed(self)
        with contextlib.suppress(FileNotFoundError):
            next(f for f in found if not f.is_symlink()).unlink()  # deleted between the listing and its stat
        return found

    runner = CliRunner()
    monkeypatch.setattr(DiskTier, "files", files_then_one_vanishes)
    out = runner.invoke(app, ["store", "stats", "--cache-dir", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    assert '"entries": 2' in out.output
    out = runner.invoke(app, ["store", "gc", "--max-bytes", "1", "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    monkeypatch.setattr(DiskTier, "files", listed)
    assert tier.usage()["entries"] == 0


@contextlib.contextmanager
def fifo_watchdog(fifo: Path, after: float = 20.0):
    """Open ``fifo`` for writing after ``after`` seconds from another process, so that an open blocked on it
    (which may hold our GIL, as safetensors' does) is released and the test fails instead of hanging the run.
    Yields a function that raises if that happened."""
    proc = subprocess.Popen(["sh", "-c", f'sleep {after}; exec 3>>"$0"', str(fifo)])
    started = time.monotonic()

    def check(what: str) -> None:
        if time.monotonic() - started >= after:
            pytest.fail(f"{what} blocked on the FIFO {fifo} until a writer opened it")

    try:
        yield check
    finally:
        proc.kill()
        proc.wait()


def test_fifo_in_place_of_a_kv_file_is_a_miss_not_a_hang(make_engine, tmp_path, caplog):
    from cacheblend_rag.cli import app

    engine = make_engine("llama", seed=8, store=[f"file://{tmp_path / 'kv'}"])
    handles = engine.precompute(PASSAGES)
    clean = engine.generate(segments(handles), max_new_tokens=4)
    disk = engine.store.tiers[0]
    path = disk.path(handles[1].key)
    path.unlink()
    os.mkfifo(path)
    with fifo_watchdog(path) as check:
        out = CliRunner().invoke(app, ["store", "stats", "--cache-dir", str(tmp_path), "--json"])
        check("cacheblend store stats")
    assert out.exit_code == 0 and '"entries": 2' in out.output
    with caplog.at_level(logging.WARNING), fifo_watchdog(path) as check:
        again = engine.generate(segments(handles), max_new_tokens=4)
        check("a request")
    assert again.token_ids == clean.token_ids and again.stats.cache_misses == 1
    assert "not a regular file" in caplog.text and path.is_file()  # the FIFO was replaced by the recomputed file


def test_a_corrupt_stored_prompt_head_is_a_miss_and_the_answer_stays(make_engine, tmp_path):
    """The prompt's head is a store entry like a chunk: garbage in its file is a miss (the head is computed again,
    and stored again), never a wrong answer or a crash."""
    engine = make_engine("llama", seed=6, store=[f"file://{tmp_path / 'kv'}"])
    handles = engine.precompute(PASSAGES)
    disk = engine.store.tiers[0]
    before = set((tmp_path / "kv").rglob("*.safetensors"))
    runs = [engine.generate(segments(handles), max_new_tokens=4, config=config("cacheblend")) for _ in range(3)]
    assert [r.stats.head_tokens for r in runs][2] > 0  # stored by the second request, read by the third
    (head_file,) = set((tmp_path / "kv").rglob("*.safetensors")) - before
    head_file.write_bytes(b"\x00garbage" * 64)
    again = engine.generate(segments(handles), max_new_tokens=4, config=config("cacheblend"))
    assert again.stats.head_tokens == 0 and again.token_ids == runs[0].token_ids
    assert disk.stats.corrupt == 1  # read, found garbage, dropped
    healed = engine.generate(segments(handles), max_new_tokens=4, config=config("cacheblend"))
    assert healed.stats.head_tokens > 0 and healed.token_ids == runs[0].token_ids  # written again: read again
