"""TTFT sweeps: against the number of chunks, against the recompute ratio, and memory vs disk tier."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..store import DiskTier, KVStore, MemoryTier
from .datasets import Example
from .ttft import _warm_up, run_info, strategy_config

UNTIERED = ("full_recompute", "prefix_cache")  # they read no chunk KV, so the tier does not matter


def _ttft(engine, example: Example, k: int, strategy: str, ratio: float, repeats: int) -> float:
    segments = example.prompt(engine, k)
    cfg = strategy_config(strategy, ratio)
    return min(engine.generate(segments, max_new_tokens=1, config=cfg).ttft_s for _ in range(repeats))


def sweep(
    engine,
    examples: Sequence[Example],
    strategies: Sequence[str],
    chunk_counts: Sequence[int],
    ratios: Sequence[float],
    ratio: float = 0.15,
    repeats: int = 1,
    tier_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Median TTFT (over ``examples``) per point of each sweep."""
    _warm_up(engine, strategies, ratio)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        tiered = [s for s in strategies if s not in UNTIERED]
        total = len(examples) * (len(chunk_counts) * len(strategies) + len(ratios) + 2 * len(tiered))
        bar = tqdm(total=total, desc="sweep", unit="run")

    def median(strategy: str, k: int, r: float) -> float:
        values = []
        for example in examples:
            values.append(_ttft(engine, example, min(k, len(example.passages)), strategy, r, repeats))
            if bar is not None:
                bar.update()
        return statistics.median(values)

    chunks = [
        {"chunks": k, "strategy": s, "median_ttft_s": median(s, k, ratio)} for k in chunk_counts for s in strategies
    ]
    by_ratio = [{"ratio": r, "strategy": "cacheblend", "median_ttft_s": median("cacheblend", 10**6, r)} for r in ratios]
    tiers = _tier_sweep(engine, strategies, ratio, tier_dir, median)
    if bar is not None:
        bar.close()
    return {
        "config": run_info(engine, n=len(examples), ratio=ratio, repeats=repeats),
        "ttft_vs_chunks": chunks,
        "ttft_vs_ratio": by_ratio,
        "ttft_by_tier": tiers,
    }


def _tier_sweep(engine, strategies, ratio, tier_dir, median) -> list[dict]:
    """Every chunk read from the memory tier, then from a disk-only store (files written first, OS page cache
    warm: this measures deserialisation and checksums, not a cold device)."""
    saved = engine.store
    out = []
    with tempfile.TemporaryDirectory(dir=tier_dir) as tmp:
        stores = {
            "memory": KVStore([MemoryTier(16 << 30)], dtype=saved.dtype, expect=saved.expect),
            "disk": KVStore([DiskTier(Path(tmp), engine.fingerprint)], dtype=saved.dtype, expect=saved.expect),
        }
        try:
            for tier, store in stores.items():
                engine.store = store
                for strategy in strategies:
                    if strategy in UNTIERED:
                        continue
                    out.append({"tier": tier, "strategy": strategy, "median_ttft_s": median(strategy, 10**6, ratio)})
        finally:
            engine.store = saved
    return out
