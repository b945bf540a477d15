"""``cacheblend store``: inspect and trim the on-disk KV store."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .common import CACHE_DIR, console, store_app


def _store_root(cache_dir: Path | None) -> Path:
    from ..model.loading import default_cache_dir

    return (cache_dir or default_cache_dir()) / "kv"


@store_app.command("stats")
def store_stats(
    cache_dir: Path | None = CACHE_DIR,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Entries and bytes in the disk KV store, per model fingerprint."""
    from collections import Counter

    from safetensors import safe_open

    from ..store import DiskTier

    root = _store_root(cache_dir)
    tier = DiskTier(root, "")
    models: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    unreadable = 0
    entries = tier.entries()  # regular files only: a FIFO would block safe_open, a dangling symlink has no size
    for f, st in entries:
        try:
            with safe_open(str(f), framework="pt") as handle:
                fp = (handle.metadata() or {}).get("model_fingerprint", "?")[:12]
        except Exception:  # an unreadable file (or one deleted meanwhile) is counted, not fatal
            unreadable += 1
            fp = "unreadable"
        models[fp] += 1
        sizes[fp] += st.st_size
    per_model = [{"fingerprint": k, "entries": v, "bytes": sizes[k]} for k, v in models.most_common()]
    usage = {"entries": len(entries), "bytes": sum(st.st_size for _, st in entries)}
    payload = {"path": str(root), **usage, "unreadable": unreadable, "models": per_model}
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
    from ..store import DiskTier, parse_bytes

    try:
        budget = parse_bytes(max_bytes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = DiskTier(_store_root(cache_dir), "").gc(budget)
    console.print(
        f"removed {result['removed']} entries ({result['freed_bytes'] / 1e6:.1f} MB); "
        f"{result['bytes'] / 1e6:.1f} MB left"
    )
