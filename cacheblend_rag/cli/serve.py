"""``cacheblend serve``: the OpenAI-compatible server (needs the ``serve`` extra). Its options and their
defaults are described in docs/SERVE.md."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from ..config import STRATEGIES
from ..serve.access import Access, parse_keys
from .common import CACHE_DIR, DEVICE, DTYPE, MODEL, app, console, load_engine


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(2)


HOST = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
PORT = typer.Option(8000, min=1, max=65535, help="Port to listen on.")
STORE = typer.Option(
    [],
    "--store",
    help="A KV store tier URL, fastest first; repeat for several, e.g. --store "
    "'memory://?max_bytes=4GB' --store redis://cache:6379/0 (or redis+cluster://h1:7000,h2:7000). "
    "Default: memory, then disk under --cache-dir.",
)
SERVED_NAME = typer.Option(None, help="The model id clients send (default: --model).")
STRATEGY = typer.Option("cacheblend", help=f"Default strategy: {', '.join(STRATEGIES)}.")
RATIO = typer.Option(0.15, min=0.0, max=1.0, help="Default cacheblend recompute ratio.")
SHARE = typer.Option(
    True,
    "--share-registry/--no-share-registry",
    help="Share the registry of chunk texts through the first Redis tier (replicas reuse each other's chunks).",
)
LOG_LEVEL = typer.Option("info", help="uvicorn's log level.")
# who may call, register and see reuse (docs/SERVE.md, the security model)
API_KEY = typer.Option(
    [],
    "--api-key",
    help="A key clients must send as 'Authorization: Bearer KEY' (every endpoint but /health); repeat for "
    "several. Default: the CACHEBLEND_API_KEY environment variable (keys separated by commas); none: no key.",
    show_default=False,
)
ADMIN_KEY = typer.Option(
    None,
    envvar="CACHEBLEND_ADMIN_KEY",
    help="The key that may register chunks under --registry-scope admin and read /metrics.",
    show_default=False,
)
SCOPE = typer.Option(
    None,
    help="Who may register chunks (POST /v1/chunks) and where they are reused: 'open' (every client; each prompt "
    "is matched against every registered text), 'admin' (the admin key only; matched in every prompt) or 'key' "
    "(every key its own scope: matched only in that key's prompts, its KV kept apart). Default: admin when a key "
    "is set, else open.",
)
REUSE_STATS = typer.Option(
    "private",
    help="Who sees reuse figures (usage.cached_tokens, the cacheblend field, already_stored): 'private' "
    "(callers that may register) or 'public' (every caller).",
)
# limits (ServerOptions and ServerLimits fields of the same names)
MAX_ACTIVE = typer.Option(
    16, min=1, help="Requests decoding together in one batch (fewer when their KV would pass --kv-memory)."
)
KV_MEMORY = typer.Option(
    None,
    help="KV memory of the decode batch: bytes (2GB, 512MiB) or a share of the device's memory (0.2); a request "
    "is admitted when its prompt and max_tokens fit beside the running ones. Default: 0.2.",
    show_default=False,
)
PREFILL_BUDGET = typer.Option(
    None,
    min=1,
    help="Rows x layers of a new request's prefill run between two decoding steps of the batch (bounds the running "
    "streams' inter-token latency). Default: 32 prompt rows through every layer.",
    show_default=False,
)
MAX_QUEUE = typer.Option(32, min=0, help="Requests that may wait beyond those; then 429 + Retry-After.")
MAX_TOKENS = typer.Option(
    256, min=1, help="The most tokens one answer may have: a request asking for more is clamped (and told so)."
)
DEFAULT_MAX_TOKENS = typer.Option(
    None, min=1, help="A request's max_tokens when it sends none (default: --max-tokens)."
)
MAX_PROMPT_BYTES = typer.Option(
    None, min=1, help="Longest prompt in UTF-8 bytes, refused (413) before tokenizing. Default: context x 32."
)
MAX_BODY_BYTES = typer.Option(
    None,
    min=1,
    help="Largest request body (413). Default: twice the larger of --max-prompt-bytes and 32 x --max-chunk-tokens "
    "(at least 1 MiB).",
)
MAX_CHUNK_TEXTS = typer.Option(256, min=1, help="Texts per POST /v1/chunks (413 past it).")
MAX_CHUNK_TOKENS = typer.Option(65536, min=1, help="Chunk tokens per POST /v1/chunks (413 past it).")
QUOTA_TEXTS = typer.Option(
    10000, min=0, help="Distinct chunks one key may register (429 past it; the admin key is exempt; 0: no quota)."
)
QUOTA_TOKENS = typer.Option(
    2000000, min=0, help="Chunk tokens one key may register (429 past it; the admin key is exempt; 0: no quota)."
)
HEADER_TIMEOUT = typer.Option(10.0, min=0.001, help="Seconds a client has to send a request's headers.")
BODY_TIMEOUT = typer.Option(30.0, min=0.001, help="Seconds a client has to send a request's body.")
KEEP_ALIVE = typer.Option(5, min=1, help="Seconds an idle connection stays open.")
MAX_CONNECTIONS = typer.Option(256, min=1, help="Connections open at once (more get 503 and are closed).")
GRACE = typer.Option(
    10.0, min=0.001, help="On SIGTERM: seconds running requests get to finish (waiting ones get 503 at once)."
)


@app.command()
def serve(
    model: str = MODEL,
    host: str = HOST,
    port: int = PORT,
    store: list[str] = STORE,
    served_model_name: str | None = SERVED_NAME,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    strategy: str = STRATEGY,
    ratio: float = RATIO,
    share_registry: bool = SHARE,
    log_level: str = LOG_LEVEL,
    api_key: list[str] = API_KEY,
    admin_key: str | None = ADMIN_KEY,
    registry_scope: str | None = SCOPE,
    reuse_stats: str = REUSE_STATS,
    max_active: int = MAX_ACTIVE,
    max_queue: int = MAX_QUEUE,
    kv_memory: str | None = KV_MEMORY,
    prefill_budget: int | None = PREFILL_BUDGET,
    max_tokens: int = MAX_TOKENS,
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    max_prompt_bytes: int | None = MAX_PROMPT_BYTES,
    max_body_bytes: int | None = MAX_BODY_BYTES,
    max_chunk_texts: int = MAX_CHUNK_TEXTS,
    max_chunk_tokens: int = MAX_CHUNK_TOKENS,
    chunk_quota_texts: int = QUOTA_TEXTS,
    chunk_quota_tokens: int = QUOTA_TOKENS,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    keep_alive_timeout: int = KEEP_ALIVE,
    max_connections: int = MAX_CONNECTIONS,
    shutdown_grace: float = GRACE,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/chunks)."""
    from ..config import BlendConfig
    from ..serve import require_serve

    access = dict(
        api_keys=list(api_key) or parse_keys(os.environ.get("CACHEBLEND_API_KEY")),
        admin_key=admin_key,
        registry_scope=registry_scope,
        reuse_stats=reuse_stats,
    )
    try:
        require_serve()
        config = BlendConfig(strategy=strategy, recompute_ratio=ratio)
        rules = Access(**access)
        memory = kv_memory_option(kv_memory)
    except (ImportError, ValueError) as exc:
        raise _fail(str(exc)) from None
    for warning in rules.warnings(host):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    engine = _engine(model, device, dtype, cache_dir, store, config, share_registry)
    from ..serve import serve as run

    keys = f"{len(access['api_keys'])} API key(s)" if access["api_keys"] else "no API key"
    console.print(
        f"serving {served_model_name or model} on http://{host}:{port}/v1 (up to {max_active} requests decoding in "
        f"one batch, {max_queue} may wait; {keys}, registry scope {rules.scope.value})",
        highlight=False,
    )
    limits = dict(header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout, max_connections=max_connections)
    options = dict(
        model_name=served_model_name or model,
        max_active=max_active,
        max_queue=max_queue,
        kv_memory=memory,
        prefill_budget=prefill_budget,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        max_prompt_bytes=max_prompt_bytes,
        max_body_bytes=max_body_bytes,
        max_chunk_texts=max_chunk_texts,
        max_chunk_tokens=max_chunk_tokens,
        chunk_quota_texts=chunk_quota_texts,
        chunk_quota_tokens=chunk_quota_tokens,
        body_timeout=body_timeout,
        shutdown_grace=shutdown_grace,
    )
    run(engine, host, port, log_level=log_level, **limits, **access, **options)


def kv_memory_option(text: str | None) -> int | float | None:
    """``--kv-memory``: a share of the memory (``0.2``: a number up to 1) or bytes (``2GB``, ``512MiB``, ``1e9``)."""
    if text is None:
        return None
    from ..store.urls import parse_bytes

    try:
        value = float(text)
    except ValueError:
        return parse_bytes(text)
    if 0 < value <= 1:
        return value
    if value > 1 and value == int(value):
        return int(value)
    raise ValueError(f"--kv-memory must be bytes (2GB, 512MiB, 1000000000) or a share in (0, 1] (0.2); got {text!r}")


def _engine(model, device, dtype, cache_dir, store, config, share_registry: bool):
    """The engine to serve (its registry shared through Redis if asked), or Exit(2) naming what is wrong."""
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
    return engine
