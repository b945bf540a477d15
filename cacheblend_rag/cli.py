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
app.add_typer(bench_app, name="bench")
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
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Multi-chunk questions answered under every strategy (offline, bundled model)."""
    from .demo import strategy_rows

    engine = load_engine(model, device, dtype, cache_dir)
    rows = strategy_rows(engine, ratio=ratio)
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


def main() -> None:
    logging.basicConfig(level=os.environ.get("CACHEBLEND_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
