"""Store benchmarks: TTFT by the tier every chunk comes from, and what int8 compression saves and costs.

``bench_tiers``: each example's passages are computed once, copied to every tier under test, and each
request is timed with all its chunks served by one tier alone (no faster tier in front, so nothing is
promoted between repeats). Variants: ``memory``; ``disk`` (page cache warm); ``disk-cold`` (the chunk files'
pages dropped before every request with ``posix_fadvise(DONTNEED)``); ``disk-slow`` (reads throttled to
``slow_mbps`` MB/s, one at a time: an emulated slow device); ``redis``. A ``-sync`` suffix reads every
chunk whole before the prefill instead of layer by layer during it. Tiers are timed in a rotating order
within each repeat, so a neighbour's load drifts over all of them alike.

``bench_compression``: fidelity to full recompute (top-1 agreement and KL of next-token distributions along
the reference answer, answer EM) of cacheblend and full_reuse with float16 and with int8 stored KV, the
bytes each takes on disk, and the int8 reconstruction error.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..store import DiskTier, KVStore, MemoryTier
from ..store.entry import CRC32, EntryReader, read_or_miss
from .datasets import Example
from .ttft import _warm_up, run_info, strategy_config

VARIANTS = (
    "memory",
    "disk",
    "disk-sync",
    "disk-cold",
    "disk-cold-sync",
    "disk-slow",
    "disk-slow-sync",
    "redis",
    "redis-sync",
)


class ThrottledTier:
    """A tier whose reads take at least bytes / ``mbps`` MB/s, one at a time: a slow device on a fast disk."""

    def __init__(self, tier, mbps: float) -> None:
        if mbps <= 0:
            raise ValueError(f"the emulated read speed must be > 0 MB/s, got {mbps}")
        self.tier, self.mbps = tier, mbps
        self.name, self.stats = f"{tier.name}-slow", tier.stats
        self._device = threading.Lock()

    def contains(self, key: str) -> bool:
        return self.tier.contains(key)

    def open(self, key: str) -> _ThrottledReader | None:
        reader = self.tier.open(key)
        return None if reader is None else _ThrottledReader(self, reader)

    def get(self, key: str):
        return read_or_miss(self.open(key))

    def put(self, key: str, kv) -> None:
        self.tier.put(key, kv)

    def delete(self, key: str) -> None:
        self.tier.delete(key)


class _ThrottledReader:
    def __init__(self, owner: ThrottledTier, reader: EntryReader) -> None:
        self.owner, self.reader, self.meta = owner, reader, reader.meta

    def read_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None:
        # out: short name -> [Hkv, T, D] (or scale) buffers, filled in place by the wrapped reader
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
        with self.owner._device:
            started = time.perf_counter()
            self.reader.read_layer(layer, out)
            rest = nbytes / (self.owner.mbps * 1e6) - (time.perf_counter() - started)
            if rest > 0:
                time.sleep(rest)

    def close(self) -> None:
        self.reader.close()


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Evict these files' pages from the OS page cache (no root needed); later reads go to the device."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class Variant:
    name: str
    store: KVStore
    before: Callable[[list[str]], None] | None = None  # called with the request's chunk keys before timing


def make_variants(engine, names: Sequence[str], root: Path, redis_url: str | None, slow_mbps: float, base: KVStore):
    """The stores under test (each holding one tier) and the tiers the chunks must be copied to."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown tier variants {unknown}; choose from {', '.join(VARIANTS)}")
    if any(n.startswith("redis") for n in names) and not redis_url:
        raise ValueError("the redis variants need --redis redis://host:port/db (a Redis the benchmark may write to)")
    disk = DiskTier(root, engine.fingerprint)
    redis = None
    if redis_url:
        from ..store import tier_from_url

        sep = "&" if "?" in redis_url else "?"
        redis = tier_from_url(
            f"{redis_url}{sep}prefix=cacheblend-bench-{uuid.uuid4().hex[:8]}:&ttl=2h", engine.fingerprint
        )
    slow = ThrottledTier(disk, slow_mbps)

    def cold(keys: list[str]) -> None:
        drop_page_cache([disk.path(k) for k in keys])

    tiers = {"disk": disk, "disk-cold": disk, "disk-slow": slow, "redis": redis}
    variants = {}
    for name in names:
        if name == "memory":
            variants[name] = Variant(name, base)
            continue
        tier_name = name.removesuffix("-sync")
        store = KVStore([tiers[tier_name]], dtype=base.dtype, expect=base.expect, pipelined=not name.endswith("-sync"))
        variants[name] = Variant(name, store, cold if tier_name == "disk-cold" else None)
    writers = [t for t in (disk if any(n.startswith("disk") for n in names) else None, redis) if t is not None]
    return variants, writers


def bench_tiers(
    engine,
    examples: Sequence[Example],
    tiers: Sequence[str] = ("memory", "disk", "disk-sync", "disk-cold", "disk-slow", "disk-slow-sync"),
    strategies: Sequence[str] = ("cacheblend",),
    ratio: float = 0.15,
    repeats: int = 3,
    slow_mbps: float = 500.0,
    redis_url: str | None = None,
    work_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Median TTFT per (tier variant, strategy) over ``examples`` (median of ``repeats`` per example), and
    the median per-example ratio to the memory tier. ``engine.store`` must have a memory tier first."""
    base = engine.store
    if not isinstance(base.tiers[0], MemoryTier):
        raise ValueError("bench_tiers needs an engine whose store starts with a memory tier (memory://...)")
    _warm_up(engine, strategies, ratio)
    rows: list[dict] = []
    kv_bytes: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples) * repeats * len(strategies) * len(tiers), desc="tiers", unit="request")
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="cacheblend-tiers-") as tmp:
        variants, writers = make_variants(engine, tiers, Path(tmp), redis_url, slow_mbps, base)
        try:
            for index, example in enumerate(examples):
                engine.store = base
                handles = engine.precompute(example.passages, register=False, context=0)
                segments = engine.chat_segments(example.user_segments(handles))
                keys = [h.key for h in handles]
                blocks = {k: base.get(k) for k in keys}
                kv_bytes.append(sum(kv.nbytes for kv in blocks.values()))
                for tier in writers:
                    for key in keys:
                        tier.put(key, blocks[key])
                for rep in range(repeats):
                    for strategy in strategies:
                        order = list(tiers)[rep % len(tiers) :] + list(tiers)[: rep % len(tiers)]
                        for name in order:
                            rows.append(_timed(engine, variants[name], keys, segments, strategy, ratio, index, rep))
                            if bar is not None:
                                bar.update()
                for tier in writers:
                    for key in keys:
                        tier.delete(key)
        finally:
            engine.store = base
            if bar is not None:
                bar.close()
    config = run_info(
        engine,
        n=len(examples),
        ratio=ratio,
        repeats=repeats,
        slow_mbps=slow_mbps,
        crc32=CRC32,
        median_kv_mb_per_example=statistics.median(kv_bytes) / 1e6,
        store_dtype=str(base.dtype),
        page_cache="disk-cold drops the chunk files' pages with posix_fadvise(DONTNEED) before each request",
    )
    return {"config": config, "rows": rows, "summary": summarize_tiers(rows, tiers, strategies)}


def _timed(engine, variant: Variant, keys, segments, strategy: str, ratio: float, index: int, rep: int) -> dict:
    if variant.before is not None:
        variant.before(keys)
    engine.store = variant.store
    result = engine.generate(segments, max_new_tokens=1, config=strategy_config(strategy, ratio))
    s = result.stats
    return {
        "example": index,
        "repeat": rep,
        "tier": variant.name,
        "strategy": strategy,
        "ttft_s": result.ttft_s,
        "load_s": s.load_s,
        "prefill_s": s.prefill_s,
        "prompt_tokens": s.prompt_tokens,
        "cache_hits": s.cache_hits,
        "cache_misses": s.cache_misses,
    }


def summarize_tiers(rows: list[dict], tiers: Sequence[str], strategies: Sequence[str]) -> list[dict]:
    out = []
    for strategy in strategies:
        per: dict[str, dict[int, list[dict]]] = {}
        for r in rows:
            if r["strategy"] == strategy:
                per.setdefault(r["tier"], {}).setdefault(r["example"], []).append(r)
        medians = {t: {e: statistics.median(x["ttft_s"] for x in rs) for e, rs in ex.items()} for t, ex in per.items()}
        for tier in tiers:
            if tier not in per:
                continue
            mine = medians[tier]
            runs = [x for rs in per[tier].values() for x in rs]
            entry = {
                "tier": tier,
                "strategy": strategy,
                "median_ttft_s": statistics.median(mine.values()),
                "median_load_s": statistics.median(x["load_s"] for x in runs),
                "spread": statistics.median(
                    (max(x["ttft_s"] for x in rs) - min(x["ttft_s"] for x in rs))
                    / statistics.median(x["ttft_s"] for x in rs)
                    for rs in per[tier].values()
                ),
                "misses": sum(x["cache_misses"] for x in runs),
                "requests": len(runs),
            }
            if "memory" in medians:
                entry["vs_memory"] = statistics.median(mine[e] / medians["memory"][e] for e in mine)
            out.append(entry)
    return out


# ---- compression ----------------------------------------------------------------------------------------
def bench_compression(
    engine,
    examples: Sequence[Example],
    ratio: float = 0.15,
    max_new_tokens: int = 32,
    dtypes: Sequence[str] = ("float16", "bfloat16", "int8"),
    progress: bool = False,
) -> dict:
    """Fidelity to full recompute with each stored KV dtype (same model), and the bytes each takes."""
    from .. import CacheBlendEngine
    from .runner import EvalConfig, evaluate

    configs = [
        EvalConfig("full_recompute", strategy_config("full_recompute", ratio)),
        EvalConfig(f"cacheblend@{ratio:g}", strategy_config("cacheblend", ratio)),
        EvalConfig("full_reuse", strategy_config("full_reuse", ratio)),
    ]
    results, sizes, errors = {}, {}, {}
    for dtype in dtypes:
        with tempfile.TemporaryDirectory(prefix="cacheblend-codec-") as tmp:
            twin = CacheBlendEngine(
                engine.model, engine.tokenizer, store_dtype=dtype, store=["memory://?max_bytes=16GB", f"file://{tmp}"]
            )
            twin.name = engine.name
            results[dtype] = evaluate(twin, examples, configs, max_new_tokens=max_new_tokens, progress=progress)
            handles = {h.key: h for e in examples for h in twin.precompute(e.passages, register=False, context=0)}
            sizes[dtype] = {
                "bytes": twin.store.tiers[1].usage()["bytes"],
                "tokens": sum(h.n_tokens for h in handles.values()),
            }
        if dtype == "int8":
            errors = _codec_error(twin, list(handles.values())[:10])
    summary = []
    for dtype, result in results.items():
        for s in result["summary"]:
            if s["config"] == "full_recompute":
                continue
            summary.append(
                {
                    "store_dtype": dtype,
                    "config": s["config"],
                    "top1_agreement": s["top1_agreement"],
                    "kl": s["kl"],
                    "answer_em_vs_full": s["answer_em_vs_full"],
                    "gold_f1": s["gold_f1"],
                    "bytes_per_token": sizes[dtype]["bytes"] / sizes[dtype]["tokens"],
                }
            )
    return {
        "config": run_info(engine, n=len(examples), ratio=ratio, max_new_tokens=max_new_tokens),
        "summary": summary,
        "sizes": sizes,
        "int8_error": errors,
        "examples": {d: r["examples"] for d, r in results.items()},
    }


def _codec_error(engine, handles) -> dict:
    """Relative RMS error of int8-decoded K and V against the computed ones (float32)."""
    from ..store.entry import encode_int8

    num_k = num_v = den_k = den_v = 0.0
    for h in handles:
        kv = engine.compute_chunk(h.token_ids)
        back = encode_int8(kv)
        num_k += float((back.k.float() - kv.k.float()).square().sum())
        num_v += float((back.v.float() - kv.v.float()).square().sum())
        den_k += float(kv.k.float().square().sum())
        den_v += float(kv.v.float().square().sum())
    return {"k_relative_rms": (num_k / den_k) ** 0.5, "v_relative_rms": (num_v / den_v) ** 0.5}
