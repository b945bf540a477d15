"""``cacheblend bench``, ``eval`` and ``plot``: measurements that print tables and write JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .common import (
    CACHE_DIR,
    CHUNK_PREFIX,
    DATA,
    DEVICE,
    DTYPE,
    MODEL,
    app,
    bench_app,
    console,
    fail,
    floats,
    items,
    load_engine,
    load_examples_or_exit,
    write_json,
)


@bench_app.command("ttft")
def bench_ttft_cmd(
    data: Path | None = DATA,
    n: int = typer.Option(10, min=1, help="Number of examples."),
    strategies: str = typer.Option(
        "full_recompute,prefix_cache,full_reuse,cacheblend[query],cacheblend[deviation]",
        help="Comma separated; cacheblend[selection] names a token selection, cacheblend@0.1 its own ratio.",
    ),
    ratio: float = typer.Option(0.15, help="cacheblend recompute ratio."),
    repeats: int = typer.Option(1, min=1, help="Time each request this many times, keep the best."),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    out: Path | None = typer.Option(Path("results/ttft.json"), "--out", help="JSON output file."),
    profile: bool = typer.Option(False, help="Also print an operator profile of one cacheblend request."),
) -> None:
    """Median TTFT per strategy on N examples (each passage one precomputed chunk)."""
    from ..eval.ttft import bench_ttft, profile_request

    examples = load_examples_or_exit(data, n)
    names = items(strategies)
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=8GB"])
    result = bench_ttft(engine, examples, names, ratio=ratio, repeats=repeats, progress=True)
    table = Table(title=f"TTFT, {len(examples)} examples, {result['config']['dtype']} on {result['config']['device']}")
    for col in ("strategy", "median TTFT s", "speedup", "median per-example speedup", "FLOP speedup", "recomputed"):
        table.add_column(col, justify="right")
    for s in result["summary"]:
        table.add_row(
            escape(s["strategy"]),  # cacheblend[query] is not rich markup
            f"{s['median_ttft_s']:.3f}",
            f"{s.get('speedup', float('nan')):.2f}x",
            f"{s.get('median_example_speedup', float('nan')):.2f}x",
            f"{s.get('flop_speedup', float('nan')):.2f}x",
            f"{s['recomputed_fraction']:.1%}",
        )
    console.print(table)
    if profile:
        console.print(profile_request(engine, examples[0], ratio=ratio))
    write_json(out, result)


@bench_app.command("sweep")
def bench_sweep_cmd(
    data: Path | None = DATA,
    n: int = typer.Option(5, min=1, help="Number of examples (median over them)."),
    strategies: str = typer.Option("full_recompute,prefix_cache,full_reuse,cacheblend", help="Comma separated."),
    chunks: str = typer.Option("1,2,4,6,8,10", help="Chunk counts for the TTFT-vs-chunks sweep."),
    ratios: str = typer.Option("0,0.05,0.1,0.15,0.25,0.5,1", help="Ratios for the TTFT-vs-ratio sweep."),
    ratio: float = typer.Option(0.15, help="cacheblend ratio for the chunk and tier sweeps."),
    repeats: int = typer.Option(1, min=1),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    out: Path = typer.Option(Path("results/sweep.json"), "--out", help="JSON output file."),
) -> None:
    """TTFT against the number of chunks and the recompute ratio, and memory vs disk tier, per strategy."""
    from ..eval.sweep import sweep

    examples = load_examples_or_exit(data, n)
    names = items(strategies)
    counts = [int(c) for c in floats(chunks, "--chunks")]
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=8GB"])
    result = sweep(
        engine, examples, names, counts, floats(ratios, "--ratios"), ratio=ratio, repeats=repeats, progress=True
    )
    table = Table(title="Median TTFT (s) vs number of chunks")
    table.add_column("chunks", justify="right")
    for name in names:
        table.add_column(escape(name), justify="right")
    for k in counts:
        cells = {r["strategy"]: r["median_ttft_s"] for r in result["ttft_vs_chunks"] if r["chunks"] == k}
        table.add_row(str(k), *(f"{cells[name]:.3f}" for name in names))
    console.print(table)
    table = Table(title="cacheblend median TTFT (s) vs recompute ratio")
    table.add_column("ratio", justify="right")
    table.add_column("TTFT s", justify="right")
    for r in result["ttft_vs_ratio"]:
        table.add_row(f"{r['ratio']:g}", f"{r['median_ttft_s']:.3f}")
    console.print(table)
    table = Table(title="Median TTFT (s) by store tier")
    for col in ("tier", "strategy", "TTFT s"):
        table.add_column(col, justify="right")
    for r in result["ttft_by_tier"]:
        table.add_row(r["tier"], escape(r["strategy"]), f"{r['median_ttft_s']:.3f}")
    console.print(table)
    write_json(out, result)


@app.command()
def plot(
    results: Path = typer.Argument(..., help="JSON written by `cacheblend eval` or `cacheblend bench sweep`."),
    out_dir: Path = typer.Option(Path("docs"), "--out-dir", help="Folder for the PNG files."),
    prefix: str = typer.Option("", help="File name prefix."),
) -> None:
    """Plot fidelity and F1 vs ratio, TTFT vs ratio, TTFT vs number of chunks."""
    from ..eval.plots import plot_results

    try:
        payload = json.loads(results.read_text())
        paths = plot_results(payload, out_dir, prefix)
    except FileNotFoundError:
        console.print(f"[red]error:[/red] results file not found: {results}")
        raise typer.Exit(2) from None
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
        console.print(f"[red]error:[/red] cannot plot {results}: {exc}")
        raise typer.Exit(2) from None
    for path in paths:
        console.print(f"wrote {path}")


@app.command("eval")
def eval_cmd(
    data: Path | None = DATA,
    n: int = typer.Option(30, min=1, help="Number of examples (the first N)."),
    strategies: str = typer.Option("full_recompute,prefix_cache,full_reuse,cacheblend", help="Comma separated."),
    ratios: str = typer.Option("0.05,0.1,0.15,0.25,0.5", help="cacheblend recompute ratios, comma separated."),
    selections: str = typer.Option(
        "query,deviation",
        help="cacheblend token selections to compare, comma separated: query, bridge, deviation, attention.",
    ),
    targets: str = typer.Option("", help="cacheblend fidelity targets (per-request ratio), comma separated."),
    chunk_heads: int = typer.Option(0, min=0, help="Always recompute each chunk's first N tokens (EPIC)."),
    check_layers: str = typer.Option(
        "", help="cacheblend check layers of the deviation and attention selections, comma separated (default 1)."
    ),
    max_new_tokens: int = typer.Option(32, min=1),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    chunk_prefix: str | None = CHUNK_PREFIX,
    context: int = typer.Option(
        2,
        "--context",
        min=0,
        help="Compute each passage's KV after its K nearest passages among every passage of the loaded examples "
        "(see --neighbours); 0: each passage alone.",
    ),
    neighbours: str = typer.Option(
        "lexical",
        "--neighbours",
        help="How --context picks a passage's neighbours: 'lexical' (TF-IDF over token ids, what "
        "engine.precompute(corpus) and `cacheblend ingest` do) or 'minilm' (also 'embedding': all-MiniLM-L6-v2 "
        "embeddings, as `cacheblend ingest --neighbours embedding`; needs the rag extra).",
    ),
    out: Path = typer.Option(Path("results/eval.json"), "--out", help="JSON output (per example and summary)."),
) -> None:
    """Quality of every strategy: gold F1/EM, gold F1 kept vs full recompute on the questions it answers (and how many
    answers are worse than full_reuse's), and fidelity to full recompute (answer EM, Rouge-L, top-1, KL)."""
    from ..config import STRATEGIES
    from ..eval.runner import eval_configs, evaluate

    examples = load_examples_or_exit(data, n)
    names = items(strategies)
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise typer.BadParameter(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    try:
        layers = tuple(int(x) for x in floats(check_layers, "--check-layers")) or None
        options = {"recompute_chunk_head": chunk_heads, "check_layers": layers}
        configs = eval_configs(
            names, floats(ratios, "--ratios"), items(selections), floats(targets, "--targets"), options
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if neighbours not in ("lexical", "minilm", "embedding"):
        raise typer.BadParameter(f"--neighbours must be 'lexical' or 'minilm' ('embedding'), got {neighbours!r}")
    embed = None
    if context and neighbours != "lexical":  # the embedding model is checked (and loaded) before the LLM
        from ..neighbours import minilm, minilm_embeddings

        try:
            minilm()
        except (ImportError, FileNotFoundError) as exc:
            raise fail(f"{exc} (lexically here: --neighbours lexical)") from None
        embed = minilm_embeddings
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=8GB"], chunk_prefix=chunk_prefix)
    result = evaluate(
        engine,
        examples,
        configs,
        max_new_tokens=max_new_tokens,
        progress=True,
        on_example=lambda r: write_json(out, r, quiet=True),
        context=context,
        embed=embed,
    )
    print_eval_table(result)
    write_json(out, result)


def print_eval_table(result: dict) -> None:
    from ..eval.runner import describe_context

    cfg = result["config"]
    table = Table(
        title=f"Quality vs full recompute, {cfg['n']} examples ({cfg['model']}, {cfg['dtype']})",
        caption=escape(describe_context(cfg)),
    )
    for col in (
        "config",
        "gold F1",
        "gold EM",
        "answer EM vs full",
        "Rouge-L vs full",
        "top-1 agree",
        "KL",
        "median TTFT s",
        "speedup",
        "recomputed",
    ):
        table.add_column(col, justify="right")
    for s in result["summary"]:
        keys = ("gold_f1", "gold_em", "answer_em_vs_full", "rouge_l_vs_full", "top1_agreement")
        quality = ["n/a" if s[k] is None else f"{s[k]:.3f}" for k in keys]
        speed = [f"{s['median_ttft_s']:.3f}", f"{s['speedup']:.2f}x", f"{s['recomputed_fraction']:.1%}"]
        table.add_row(escape(s["config"]), *quality, f"{s['kl']:.4f}", *speed)
    console.print(table)
    print_answered_table(result)


def print_answered_table(result: dict) -> None:
    """Gold F1 on the questions full recompute answers, kept vs full recompute's, per passages an answer needs."""
    summary = [s for s in result["summary"] if s.get("answered")]
    if not summary:
        return
    kinds = sorted({k for s in summary for k in s.get("by_passages", {})})
    table = Table(title=f"Gold F1 on the {summary[0]['answered']} questions full recompute answers (F1 >= 0.5)")
    for col in ("config", "gold F1", "kept", *(f"kept, {k} passage(s)" for k in kinds), "worse than full_reuse"):
        table.add_column(col, justify="right")
    for s in summary:
        by = s.get("by_passages", {})
        per_kind = [f"{by[k]['kept_answered']:.0%} of {by[k]['answered']}" if k in by else "n/a" for k in kinds]
        worse = s.get("worse_than_reuse")
        table.add_row(
            escape(s["config"]),
            f"{s['gold_f1_answered']:.3f}",
            f"{s['kept_answered']:.0%}",
            *per_kind,
            "n/a" if worse is None else str(worse),
        )
    console.print(table)
