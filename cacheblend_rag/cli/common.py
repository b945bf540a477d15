"""Shared pieces of the ``cacheblend`` command: the app, common options, engine loading, output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="CacheBlend for RAG: reuse chunk KV caches, recompute what matters.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (they print tables and write JSON).", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and trim the on-disk KV store.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(store_app, name="store")
console = Console(width=None if sys.stdout.isatty() else 150)

MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Alias, .gguf file, model folder or Hugging Face id.")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
DTYPE = typer.Option("auto", help="auto, float32 or bfloat16.")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Model conversions and KV store (default ~/.cache/cacheblend_rag).")
DATA = typer.Option(
    None, "--data", help="Evaluation data: a MuSiQue-style JSON file, a folder of wikimqa samples, or 'town' (bundled)."
)
CHUNK_PREFIX = typer.Option(
    None, "--chunk-prefix", help="Text chunks are computed after (default: the chat template's start)."
)


def load_engine(model: str, device: str, dtype: str, cache_dir: Path | None, **kwargs):
    from .. import CacheBlendEngine

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


def items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option ("a, b,,c" -> ["a", "b", "c"])."""
    return [x.strip() for x in text.split(",") if x.strip()]


def floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in items(text)]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None


def load_examples_or_exit(data: Path | None, n: int):
    from ..eval.datasets import DataError, load_examples

    if data is None:
        console.print("[red]error:[/red] --data is required: a MuSiQue-style JSON file (e.g. --data "
                      "../shared/data/musique_dev.json), a folder of wikimqa samples, or --data town")  # fmt: skip
        raise typer.Exit(2)
    try:
        return load_examples(data, n)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
