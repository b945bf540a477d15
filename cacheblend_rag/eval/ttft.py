"""TTFT benchmark: every strategy on the same prompts, with the speedup a FLOP count predicts."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence

import torch

from ..config import BlendConfig
from .datasets import Example


def strategy_config(name: str, ratio: float, **kw) -> BlendConfig:
    """The BlendConfig of a strategy name, which may name a cacheblend selection and its own ratio:
    ``cacheblend[deviation]``, ``cacheblend@0.1``, ``cacheblend[query]@0.05`` (``ratio`` otherwise)."""
    name, at, own = name.partition("@")
    if at:
        try:
            ratio = float(own)
        except ValueError:
            raise ValueError(f"{name}@{own}: the ratio after '@' must be a number, e.g. cacheblend@0.1") from None
    strategy, _, selection = name.partition("[")
    if selection:
        kw["selection"] = selection.removesuffix("]")
    return BlendConfig(strategy=strategy, recompute_ratio=ratio, **kw)


def bench_ttft(
    engine,
    examples: Sequence[Example],
    strategies: Sequence[str],
    ratio: float = 0.15,
    repeats: int = 1,
    progress: bool = False,
) -> dict:
    """Precompute each example's passages, then time the first token of every strategy (best of ``repeats``)."""
    _warm_up(engine, strategies, ratio)
    rows = []
    items = list(enumerate(examples))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="ttft", unit="example")
    for index, example in items:
        segments = example.prompt(engine)
        for strategy in strategies:
            best = None
            for _ in range(repeats):
                result = engine.generate(segments, max_new_tokens=1, config=strategy_config(strategy, ratio))
                if best is None or result.ttft_s < best.ttft_s:
                    best = result
            s = best.stats
            rows.append(
                {
                    "example": index,
                    "strategy": strategy,
                    "ttft_s": best.ttft_s,
                    "load_s": s.load_s,
                    "prefill_s": s.prefill_s,
                    "prompt_tokens": s.prompt_tokens,
                    "cached_tokens": s.cached_tokens,
                    "reused_tokens": s.reused_tokens,
                    "recomputed_tokens": s.recomputed_tokens,
                    "prefill_flops": s.prefill_flops,
                }
            )
    return {
        "config": run_info(engine, ratio=ratio, repeats=repeats, n=len(examples)),
        "rows": rows,
        "summary": summarize(rows, strategies),
    }


def _warm_up(engine, strategies: Sequence[str], ratio: float) -> None:
    handles = engine.precompute(["Warm-up passage one.", "Warm-up passage two."], register=False, context=0)
    for strategy in strategies:
        engine.generate(["Q: ", *handles, " A:"], max_new_tokens=1, config=strategy_config(strategy, ratio))


def summarize(rows: list[dict], strategies: Sequence[str]) -> list[dict]:
    """Median TTFT per strategy, speedup over full_recompute (ratio of medians and median of per-example
    ratios) and the ideal speedup from the FLOP count."""
    by = {(r["example"], r["strategy"]): r for r in rows}
    examples = sorted({r["example"] for r in rows})
    out = []
    for strategy in strategies:
        mine = [by[(e, strategy)] for e in examples if (e, strategy) in by]
        entry = {
            "strategy": strategy,
            "median_ttft_s": statistics.median(r["ttft_s"] for r in mine),
            "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in mine),
            "recomputed_fraction": sum(r["recomputed_tokens"] for r in mine) / sum(r["prompt_tokens"] for r in mine),
        }
        base = [
            (by[(e, "full_recompute")], by[(e, strategy)])
            for e in examples
            if (e, "full_recompute") in by and (e, strategy) in by
        ]
        if base:
            full_median = statistics.median(f["ttft_s"] for f, _ in base)
            entry["speedup"] = full_median / entry["median_ttft_s"]
            entry["median_example_speedup"] = statistics.median(f["ttft_s"] / r["ttft_s"] for f, r in base)
            entry["flop_speedup"] = statistics.median(f["prefill_flops"] / r["prefill_flops"] for f, r in base)
        out.append(entry)
    return out


def run_info(engine, **extra) -> dict:
    return {
        "model": engine.name,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        **extra,
    }


def profile_request(engine, example: Example, strategy: str = "cacheblend", ratio: float = 0.15, rows: int = 15) -> str:
    """Top operators of one request by self CPU time (where the remaining time goes)."""
    from torch.profiler import ProfilerActivity, profile

    segments = example.prompt(engine)
    cfg = strategy_config(strategy, ratio)
    engine.generate(segments, max_new_tokens=1, config=cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.generate(segments, max_new_tokens=1, config=cfg)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
