"""The ``cacheblend`` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="CacheBlend for RAG: reuse chunk KV caches, recompute what matters.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (they print tables and write JSON).", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and trim the on-disk KV store.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(store_app, name="store")
console = Console(width=None if sys.stdout.isatty() else 150)

MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Alias, .gguf file, model folder or Hugging Face id.")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
DTYPE = typer.Option("auto", help="auto, float32 or bfloat16.")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Model conversions and KV store [default: ~/.cache/cacheblend_rag].")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique_dev.json"


def load_engine(model: str, device: str, dtype: str, cache_dir: Path | None, **kwargs):
    from . import CacheBlendEngine

    with console.status(f"loading {model} ..."):
        engine = CacheBlendEngine.from_pretrained(model, device=device, dtype=dtype, cache_dir=cache_dir, **kwargs)
    console.print(f"[dim]{engine!r}[/dim]")
    return engine


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {path}")


@app.command()
def demo(
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    ratio: float = typer.Option(0.15, help="cacheblend recompute ratio."),
    max_new_tokens: int = typer.Option(32, min=1, help="Answer length limit."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Multi-chunk questions answered under every strategy (offline, bundled model)."""
    from .demo import strategy_rows

    engine = load_engine(model, device, dtype, cache_dir)
    rows = strategy_rows(engine, ratio=ratio, max_new_tokens=max_new_tokens)
    table = Table(title=f"Strategies on multi-chunk questions ({engine.name}, {str(engine.dtype)[6:]})")
    table.add_column("question", overflow="fold", max_width=30)
    table.add_column("strategy", no_wrap=True)
    table.add_column("answer", overflow="fold")
    for col in ("TTFT ms", "reused", "recomputed"):
        table.add_column(col, justify="right", no_wrap=True)
    last = None
    for r in rows:
        question = r["question"] if r["question"] != last else ""
        if question and last is not None:
            table.add_section()
        last = r["question"]
        table.add_row(question, r["strategy"], r["answer"], f"{r['ttft_s'] * 1000:.0f}", str(r["reused_tokens"]),
                      str(r["recomputed_tokens"]))  # fmt: skip
    console.print(table)
    write_json(json_out, {"rows": rows})


@bench_app.command("ttft")
def bench_ttft_cmd(
    data: Path = typer.Option(DEFAULT_DATA, help="MuSiQue-style JSON file."),
    n: int = typer.Option(10, min=1, help="Number of examples."),
    strategies: str = typer.Option("full_recompute,prefix_cache,full_reuse,cacheblend", help="Comma separated."),
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
    from .eval.datasets import load_examples
    from .eval.ttft import bench_ttft, profile_request

    examples = load_examples(data, n)
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=8GB"])
    result = bench_ttft(engine, examples, names, ratio=ratio, repeats=repeats, progress=True)
    table = Table(title=f"TTFT, {len(examples)} examples, {result['config']['dtype']} on {result['config']['device']}")
    for col in ("strategy", "median TTFT s", "speedup", "median per-example speedup", "FLOP speedup",
                "recomputed"):  # fmt: skip
        table.add_column(col, justify="right")
    for s in result["summary"]:
        table.add_row(s["strategy"], f"{s['median_ttft_s']:.3f}", f"{s.get('speedup', float('nan')):.2f}x",
                      f"{s.get('median_example_speedup', float('nan')):.2f}x",
                      f"{s.get('flop_speedup', float('nan')):.2f}x", f"{s['recomputed_fraction']:.1%}")  # fmt: skip
    console.print(table)
    if profile:
        console.print(profile_request(engine, examples[0], ratio=ratio))
    write_json(out, result)


@bench_app.command("sweep")
def bench_sweep_cmd(
    data: Path = typer.Option(DEFAULT_DATA, help="MuSiQue-style JSON file."),
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
    from .eval.datasets import DataError, load_examples
    from .eval.sweep import sweep

    try:
        examples = load_examples(data, n)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    counts = [int(c) for c in _floats(chunks, "--chunks")]
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=8GB"])
    result = sweep(engine, examples, names, counts, _floats(ratios, "--ratios"), ratio=ratio, repeats=repeats,
                   progress=True)  # fmt: skip
    table = Table(title="Median TTFT (s) vs number of chunks")
    table.add_column("chunks", justify="right")
    for name in names:
        table.add_column(name, justify="right")
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
        table.add_row(r["tier"], r["strategy"], f"{r['median_ttft_s']:.3f}")
    console.print(table)
    write_json(out, result)


@app.command()
def plot(
    results: Path = typer.Argument(..., help="JSON written by `cacheblend eval` or `cacheblend bench sweep`."),
    out_dir: Path = typer.Option(Path("docs"), "--out-dir", help="Folder for the PNG files."),
    prefix: str = typer.Option("", help="File name prefix."),
) -> None:
    """Plot fidelity and F1 vs ratio, TTFT vs ratio, TTFT vs number of chunks."""
    from .eval.plots import plot_results

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


def _store_root(cache_dir: Path | None) -> Path:
    from .model.loading import default_cache_dir

    return (cache_dir or default_cache_dir()) / "kv"


@store_app.command("stats")
def store_stats(
    cache_dir: Path | None = CACHE_DIR,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Entries and bytes in the disk KV store, per model fingerprint."""
    from collections import Counter

    from safetensors import safe_open

    from .store import DiskTier

    root = _store_root(cache_dir)
    tier = DiskTier(root, "")
    models: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    unreadable = 0
    for f in tier.files():
        try:
            with safe_open(str(f), framework="pt") as handle:
                fp = (handle.metadata() or {}).get("model_fingerprint", "?")[:12]
        except Exception:  # an unreadable file is counted, not fatal
            unreadable += 1
            fp = "unreadable"
        models[fp] += 1
        sizes[fp] += f.stat().st_size
    per_model = [{"fingerprint": k, "entries": v, "bytes": sizes[k]} for k, v in models.most_common()]
    payload = {"path": str(root), **tier.usage(), "unreadable": unreadable, "models": per_model}
    if json_out:
        print(json.dumps(payload, indent=2))
        return
    table = Table(title=f"KV store at {root}")
    for col in ("model fingerprint", "entries", "MB"):
        table.add_column(col, justify="right")
    for m in payload["models"]:
        table.add_row(m["fingerprint"], str(m["entries"]), f"{m['bytes'] / 1e6:.1f}")
    table.add_row("total", str(payload["entries"]), f"{payload['bytes'] / 1e6:.1f}")
    console.print(table)


@store_app.command("gc")
def store_gc(
    max_bytes: str = typer.Option(..., "--max-bytes", help="Keep at most this much, e.g. 2GB or 500MiB."),
    cache_dir: Path | None = CACHE_DIR,
) -> None:
    """Delete least recently used KV files until the store fits in --max-bytes."""
    from .store import DiskTier, parse_bytes

    try:
        budget = parse_bytes(max_bytes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = DiskTier(_store_root(cache_dir), "").gc(budget)
    console.print(f"removed {result['removed']} entries ({result['freed_bytes'] / 1e6:.1f} MB); "
                  f"{result['bytes'] / 1e6:.1f} MB left")  # fmt: skip


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(DEFAULT_DATA, help="MuSiQue-style JSON file (list of {ctxs, question, answers})."),
    n: int = typer.Option(30, min=1, help="Number of examples (the first N)."),
    strategies: str = typer.Option("full_recompute,prefix_cache,full_reuse,cacheblend", help="Comma separated."),
    ratios: str = typer.Option("0.05,0.1,0.15,0.25,0.5", help="cacheblend recompute ratios, comma separated."),
    max_new_tokens: int = typer.Option(32, min=1),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    out: Path = typer.Option(Path("results/eval.json"), "--out", help="JSON output (per example and summary)."),
) -> None:
    """Quality of every strategy: gold F1/EM and fidelity to full recompute (answer EM, Rouge-L, top-1, KL)."""
    from .config import STRATEGIES
    from .eval.datasets import DataError, load_examples
    from .eval.runner import eval_configs, evaluate

    try:
        examples = load_examples(data, n)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise typer.BadParameter(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    try:
        configs = eval_configs(names, _floats(ratios, "--ratios"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    engine = load_engine(model, device, dtype, cache_dir, store=["memory://?max_bytes=8GB"])
    result = evaluate(engine, examples, configs, max_new_tokens=max_new_tokens, progress=True)
    print_eval_table(result)
    write_json(out, result)


def print_eval_table(result: dict) -> None:
    cfg = result["config"]
    table = Table(title=f"Quality vs full recompute, {cfg['n']} examples ({cfg['model']}, {cfg['dtype']})")
    for col in ("config", "gold F1", "gold EM", "answer EM vs full", "Rouge-L vs full", "top-1 agree", "KL",
                "median TTFT s", "speedup", "recomputed"):  # fmt: skip
        table.add_column(col, justify="right")
    for s in result["summary"]:
        keys = ("gold_f1", "gold_em", "answer_em_vs_full", "rouge_l_vs_full", "top1_agreement")
        quality = [f"{s[k]:.3f}" for k in keys]
        speed = [f"{s['median_ttft_s']:.3f}", f"{s['speedup']:.2f}x", f"{s['recomputed_fraction']:.1%}"]
        table.add_row(s["config"], *quality, f"{s['kl']:.4f}", *speed)
    console.print(table)


def main() -> None:
    logging.basicConfig(level=os.environ.get("CACHEBLEND_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
