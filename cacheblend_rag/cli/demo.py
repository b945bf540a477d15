"""``cacheblend demo``: the quick-start command."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import CACHE_DIR, DEVICE, DTYPE, MODEL, app, console, load_engine, write_json


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
    from ..demo import strategy_rows

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
