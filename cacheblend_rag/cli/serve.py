"""``cacheblend serve``: the OpenAI-compatible server (needs the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..config import STRATEGIES
from .common import CACHE_DIR, DEVICE, DTYPE, MODEL, app, console, load_engine


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(2)


@app.command()
def serve(
    model: str = MODEL,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    store: list[str] = typer.Option(
        [],
        "--store",
        help="A KV store tier URL, fastest first; repeat for several, e.g. --store "
        "'memory://?max_bytes=4GB' --store redis://cache:6379/0 (or redis+cluster://h1:7000,h2:7000). "
        "Default: memory, then disk under --cache-dir.",
    ),
    served_model_name: str | None = typer.Option(None, help="The model id clients send (default: --model)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    strategy: str = typer.Option("cacheblend", help=f"Default strategy: {', '.join(STRATEGIES)}."),
    ratio: float = typer.Option(0.15, min=0.0, max=1.0, help="Default cacheblend recompute ratio."),
    max_active: int = typer.Option(4, min=1, help="Requests decoded by turns (each prefill runs alone)."),
    max_queue: int = typer.Option(32, min=0, help="Requests that may wait beyond those; then 429 + Retry-After."),
    max_tokens: int = typer.Option(256, min=1, help="Answer length when a request sets no max_tokens."),
    share_registry: bool = typer.Option(
        True,
        "--share-registry/--no-share-registry",
        help="Share the registry of chunk texts through the first Redis tier (replicas reuse each other's chunks).",
    ),
    log_level: str = typer.Option("info", help="uvicorn's log level."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/chunks)."""
    from ..config import BlendConfig
    from ..serve import require_serve

    try:
        require_serve()
        config = BlendConfig(strategy=strategy, recompute_ratio=ratio)
    except (ImportError, ValueError) as exc:
        raise _fail(str(exc)) from None
    try:
        engine = load_engine(model, device, dtype, cache_dir, store=list(store) or None, config=config)
    except (ImportError, ValueError, TypeError) as exc:
        raise _fail(str(exc)) from None
    remote = [url for url in store if url.split(":", 1)[0] in ("redis", "rediss", "redis+cluster", "rediss+cluster")]
    if remote and dtype == "auto" and engine.device.type == "cpu":
        chosen = str(engine.dtype).removeprefix("torch.")
        console.print(
            f"[yellow]warning:[/yellow] --dtype auto chose {chosen} by timing a matmul on this CPU; "
            "replicas sharing a store share chunks only if they compute in the same dtype: pass "
            "--dtype bfloat16 or --dtype float32 to every replica",
            highlight=False,
        )
    if share_registry:
        from ..engine.shared_registry import share_registry as share

        shared = share(engine)
        if shared is not None:
            console.print(f"chunk registry shared at {shared.key[:40]}... on {shared.tier.where}", highlight=False)
    from ..serve import serve as run

    console.print(
        f"serving {served_model_name or model} on http://{host}:{port}/v1 (one prefill at a time, "
        f"{max_active} decoding by turns, {max_queue} may wait)",
        highlight=False,
    )
    run(
        engine,
        host,
        port,
        log_level=log_level,
        model_name=served_model_name or model,
        max_active=max_active,
        max_queue=max_queue,
        default_max_tokens=max_tokens,
    )
