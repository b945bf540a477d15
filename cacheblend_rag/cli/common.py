"""Shared pieces of the ``cacheblend`` command: the app, common options, engine loading, output."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="CacheBlend for RAG: reuse chunk KV caches, recompute what matters.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (they print tables and write JSON).", no_args_is_help=True)
store_app = typer.Typer(help="Inspect and trim the on-disk KV store.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(store_app, name="store")
console = Console(width=None if sys.stdout.isatty() else 150)
logger = logging.getLogger(__name__)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` (one line) and return the Exit(2) to raise."""
    text = escape(" ".join(str(message).split()))
    console.print(f"[red]error:[/red] {text}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _check_device(value: str) -> str:
    from ..model.loading import resolve_device

    try:
        resolve_device(value)
    except ValueError:  # a CUDA device without CUDA
        raise fail(f"--device {value}: CUDA is not available here; use --device cpu or --device auto") from None
    except RuntimeError:
        raise fail(f"--device {value} is not a device name; use auto, cpu, cuda or cuda:N") from None
    return value


def _check_dtype(value: str) -> str:
    import torch

    from ..model.loading import resolve_dtype

    if value != "auto":
        try:
            resolve_dtype(value, torch.device("cpu"))
        except ValueError:
            raise fail(f"--dtype {value} is not supported; use auto, float32, bfloat16 or float16") from None
    return value


def unit_interval(name: str):
    """Option callback: a number in [0, 1] (NaN and infinities are refused by name, not as "> 1")."""

    def check(value: float) -> float:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise fail(f"{name} must be a number in [0, 1], got {value}")
        return value

    return check


MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Alias, .gguf file, model folder or Hugging Face id.")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.", callback=_check_device)
DTYPE = typer.Option("auto", help="auto, float32 or bfloat16.", callback=_check_dtype)
CACHE_DIR = typer.Option(None, "--cache-dir", help="Model conversions and KV store (default ~/.cache/cacheblend_rag).")
DATA = typer.Option(
    None,
    "--data",
    help="Evaluation data: a MuSiQue-style JSON file, a folder of wikimqa samples, a folder with questions.json and "
    "corpus/*.md, or 'town' (bundled).",
)
CHUNK_PREFIX = typer.Option(
    None, "--chunk-prefix", help="Text chunks are computed after (default: the chat template's start)."
)


def load_engine(model: str, device: str, dtype: str, cache_dir: Path | None, **kwargs):
    from .. import CacheBlendEngine

    try:
        with console.status(f"loading {model} ..."):
            engine = CacheBlendEngine.from_pretrained(model, device=device, dtype=dtype, cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # a missing model, a bad option, no memory...: one line, the traceback in the debug log
        logger.debug("loading %s failed", model, exc_info=True)
        raise fail(f"could not load the model {model!r}: {exc} (CACHEBLEND_LOG=DEBUG shows the traceback)") from None
    console.print(f"[dim]{engine!r}[/dim]")
    return engine


def write_json(path: Path | None, payload: dict, quiet: bool = False) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)  # a run killed mid-write leaves the previous file whole
    if not quiet:
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
        console.print(
            "[red]error:[/red] --data is required: a MuSiQue-style JSON file (e.g. --data "
            "../shared/data/musique_dev.json), a folder of wikimqa samples, a folder with questions.json and "
            "corpus/*.md, or --data town"
        )
        raise typer.Exit(2)
    try:
        return load_examples(data, n)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
