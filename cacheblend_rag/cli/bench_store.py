"""``cacheblend bench tiers`` and ``bench compress``: the KV store's speed by tier, and int8 compression."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import (
    CACHE_DIR,
    DATA,
    DEVICE,
    DTYPE,
    MODEL,
    bench_app,
    console,
    items,
    load_engine,
    load_examples_or_exit,
)
from .common import write_json as _write_json


@bench_app.command("tiers")
def bench_tiers_cmd(
    data: Path | None = DATA,
    n: int = typer.Option(10, min=1, help="Number of examples."),
    tiers: str = typer.Option(
        "memory,disk,disk-sync,disk-cold,disk-slow,disk-slow-sync",
        help="Comma separated, from memory, disk, disk-cold (page cache dropped), disk-slow (throttled to "
        "--slow-mbps), redis; a -sync suffix reads chunks whole before the prefill instead of layer by layer.",
    ),
    strategies: str = typer.Option("cacheblend", help="Comma separated strategies that read chunks."),
    ratio: float = typer.Option(0.15, help="cacheblend recompute ratio."),
    repeats: int = typer.Option(3, min=1, help="Requests per example and tier (the median is kept)."),
    slow_mbps: float = typer.Option(500.0, help="Read speed of the emulated slow device, MB/s."),
    redis: str | None = typer.Option(None, help="Redis for the redis variants, e.g. redis://127.0.0.1:6379/0."),
    work_dir: Path | None = typer.Option(None, help="Folder for the disk tier's files [default: the temp dir]."),
    store_dtype: str = typer.Option(
        "auto", help="Stored KV: auto (the engine's default), float16, bfloat16, float32 or int8."
    ),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    out: Path | None = typer.Option(Path("results/tiers.json"), "--out", help="JSON output file."),
) -> None:
    """TTFT with every chunk served by one tier: memory vs disk (warm, cold, slow) vs Redis, pipelined or not."""
    from ..eval.tiers import bench_tiers

    examples = load_examples_or_exit(data, n)
    names = items(tiers)
    try:
        engine = load_engine(
            model, device, dtype, cache_dir, store=["memory://?max_bytes=16GB"], store_dtype=store_dtype
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        result = bench_tiers(
            engine,
            examples,
            names,
            items(strategies),
            ratio=ratio,
            repeats=repeats,
            slow_mbps=slow_mbps,
            redis_url=redis,
            work_dir=work_dir,
            progress=True,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    cfg = result["config"]
    kv_mb = cfg["median_kv_mb_per_example"]
    table = Table(
        title=f"TTFT by store tier, {cfg['n']} examples x {cfg['repeats']} repeats, {kv_mb:.0f} MB of KV "
        f"per example ({cfg['dtype']} on {cfg['device']})"
    )
    for col in ("tier", "strategy", "median TTFT s", "vs memory", "median load s", "spread", "misses"):
        table.add_column(col, justify="right")
    for s in result["summary"]:
        table.add_row(
            s["tier"],
            s["strategy"],
            f"{s['median_ttft_s']:.3f}",
            f"{s.get('vs_memory', float('nan')):.3f}x",
            f"{s['median_load_s']:.3f}",
            f"{s['spread']:.1%}",
            f"{s['misses']}/{s['requests']}",
        )
    console.print(table)
    console.print(
        "[dim]vs memory: median over examples of (this tier's TTFT / the memory tier's); spread: median "
        "over examples of (max - min) / median of the repeats.[/dim]"
    )
    _write_json(out, result)


@bench_app.command("compress")
def bench_compress_cmd(
    data: Path | None = DATA,
    n: int = typer.Option(10, min=1, help="Number of examples."),
    ratio: float = typer.Option(0.15, help="cacheblend recompute ratio."),
    max_new_tokens: int = typer.Option(32, min=1),
    store_dtypes: str = typer.Option("float16,bfloat16,int8", help="Stored KV dtypes to compare, comma separated."),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    out: Path | None = typer.Option(Path("results/compress.json"), "--out", help="JSON output file."),
) -> None:
    """Fidelity to full recompute and bytes per token with float16 vs int8 stored KV."""
    from ..eval.tiers import bench_compression

    examples = load_examples_or_exit(data, n)
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=16GB"])
    names = items(store_dtypes)
    unknown = [d for d in names if d not in ("float16", "bfloat16", "float32", "int8")]
    if unknown:
        raise typer.BadParameter(f"unknown store dtypes {unknown}; choose from float16, bfloat16, float32, int8")
    result = bench_compression(
        engine, examples, ratio=ratio, max_new_tokens=max_new_tokens, dtypes=names, progress=True
    )
    compute = result["config"]["dtype"]
    table = Table(title=f"Stored KV dtypes, {len(examples)} examples ({compute} compute), fidelity to full recompute")
    for col in ("store dtype", "config", "top-1 agree", "KL", "answer EM vs full", "gold F1", "bytes/token"):
        table.add_column(col, justify="right")
    for s in result["summary"]:
        quality = [
            f"{s['top1_agreement']:.3f}",
            f"{s['kl']:.4f}",
            f"{s['answer_em_vs_full']:.3f}",
            f"{s['gold_f1']:.3f}",
        ]
        table.add_row(s["store_dtype"], s["config"], *quality, f"{s['bytes_per_token']:.0f}")
    console.print(table)
    err = result["int8_error"]
    if err:
        console.print(f"int8 relative RMS error: K {err['k_relative_rms']:.4f}, V {err['v_relative_rms']:.4f}")
    _write_json(out, result)
