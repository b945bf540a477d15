"""``cacheblend ingest`` and ``cacheblend ask``: a persistent RAG index over your own .txt / .md files.

The index is the RAG app's (``cacheblend_rag_app``, the layer above the LlamaIndex integration); these
commands import it when they run, and say what to install when it is missing. Nothing else in the core
package imports it or LlamaIndex.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import STRATEGIES
from .common import CACHE_DIR, DEVICE, DTYPE, MODEL, app, console, fail, load_engine, unit_interval, write_json

INDEX_DIR = typer.Option(None, "--index-dir", help="Where the index is kept (default: CACHE_DIR/index).")


def index_dir_or_default(index_dir: Path | None, cache_dir: Path | None) -> Path:
    from ..model.loading import default_cache_dir

    return (index_dir or (cache_dir or default_cache_dir()) / "index").expanduser()


RAG_INSTALL = "pip install -e integrations/llama-index-cacheblend -e app (from the repository root)"


def find_rag_app(check_llama_index: bool = True):
    """(the RAG app package, None) when it (and, if asked, the LlamaIndex pieces it uses) is installed, else
    (None, what is missing and how to install it)."""
    try:
        import cacheblend_rag_app
    except ImportError as exc:
        return None, f"the RAG commands need the RAG app (missing {exc.name}): {RAG_INSTALL}"
    if check_llama_index:
        try:
            cacheblend_rag_app.require_llama_index()
        except ImportError as exc:
            return None, str(exc)
    return cacheblend_rag_app, None


def rag_app(check_llama_index: bool = True):
    """The RAG app package (see ``find_rag_app``), or exit 2 saying what to install."""
    rag, missing = find_rag_app(check_llama_index)
    if missing is not None:
        raise fail(missing)
    return rag


@app.command()
def ingest(
    path: Path = typer.Argument(..., help="A folder of .txt/.md files (searched recursively) or one such file."),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    index_dir: Path | None = INDEX_DIR,
    chunk_size: int = typer.Option(384, min=32, help="Tokens per chunk (the node splitter's chunk_size)."),
    chunk_overlap: int = typer.Option(32, min=0, help="Tokens shared by neighbouring chunks of one file."),
    max_kv_bytes: str = typer.Option(
        "20GB",
        "--max-kv-bytes",
        help="Refuse (before computing anything) an ingest that would write more KV than this, e.g. 500MB, 2TB; "
        "'none' for no cap.",
    ),
    context: int = typer.Option(
        2,
        "--context",
        min=0,
        help="Compute each chunk's KV after its K nearest chunks of the index (see --neighbours), as a retrieved "
        "prompt holds it among other passages; 0: each chunk alone.",
    ),
    neighbours: str = typer.Option(
        "lexical",
        "--neighbours",
        help="How --context finds a chunk's nearest chunks: 'lexical' (TF-IDF over token ids, as engine.precompute "
        "does) or 'embedding' (the index's MiniLM embeddings).",
    ),
) -> None:
    """Index documents and precompute each chunk's KV cache (replaces the index in --index-dir).

    Before computing, it says how many chunks and how much KV it will write; progress bars show the rest
    with an estimate of the time left."""
    from ..store import parse_bytes

    rag = rag_app(check_llama_index=False)  # the cheap checks of the input come first

    if chunk_overlap >= chunk_size:
        raise fail(f"--chunk-overlap must be smaller than --chunk-size, got {chunk_overlap} >= {chunk_size}")
    if neighbours not in ("lexical", "embedding"):
        raise fail(f"--neighbours must be 'lexical' or 'embedding', got {neighbours!r}")
    try:
        cap = None if max_kv_bytes.strip().lower() in ("none", "unlimited") else parse_bytes(max_kv_bytes)
    except ValueError as exc:
        raise fail(f"--max-kv-bytes: {exc}, or none") from None
    folder = index_dir_or_default(index_dir, cache_dir)
    try:
        documents = rag.read_documents(path)
        rag.check_replaceable(folder)
    except (rag.DocumentError, rag.RagIndexError) as exc:
        raise fail(str(exc)) from None
    rag_app()
    size = sum(len(d.text) for d in documents)
    console.print(
        f"read {len(documents)} document{'s' * (len(documents) != 1)} ({size / 1e6:.1f} MB of text) from {path}",
        highlight=False,
    )
    engine = load_engine(model, device, dtype, cache_dir)
    before = engine.metrics()

    def show_plan(plan) -> None:
        console.print(f"{plan.describe()} to write to the KV store", highlight=False)
        warn_disk_space(engine, plan.kv_bytes, rag.human_bytes)

    try:
        index = rag.RagIndex.build(
            engine,
            documents,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            progress=True,
            max_kv_bytes=cap,
            on_plan=show_plan,
            context=context,
            neighbours=neighbours,
        )
    except rag.KVBudgetError as exc:
        raise fail(str(exc)) from None
    after = engine.metrics()
    index.persist(folder)
    computed = after["precomputed_chunks"] - before["precomputed_chunks"]
    stored = after["precompute_cache_hits"] - before["precompute_cache_hits"]
    console.print(
        f"indexed {len(documents)} documents as {index.n_nodes} chunks into {folder}\n"
        f"KV cache: {computed} chunks computed, {stored} already stored, in {engine.cache_dir / 'kv'}",
        highlight=False,
    )
    where = f" --index-dir {folder}" if index_dir else ""
    console.print(f'ask with: [bold]cacheblend ask "your question"{where}[/bold]', highlight=False)


def warn_disk_space(engine, kv_bytes: int, human_bytes) -> None:
    """Say so when the KV to write is more than the free space where the disk tier keeps it."""
    import shutil

    from ..store import DiskTier

    for tier in engine.store.tiers:
        if not isinstance(tier, DiskTier):
            continue
        where = tier.root
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        if kv_bytes > free:
            console.print(
                f"[yellow]warning:[/yellow] only {human_bytes(free)} free under {tier.root}: the KV that "
                "does not fit is not stored (it is computed again when needed)",
                highlight=False,
            )


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question, answered from the ingested documents."),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    index_dir: Path | None = INDEX_DIR,
    strategy: str = typer.Option("cacheblend", help=f"How the prompt's KV is built: {', '.join(STRATEGIES)}."),
    ratio: float = typer.Option(0.15, help="cacheblend recompute ratio, in [0, 1].", callback=unit_interval("--ratio")),
    top_k: int = typer.Option(8, "--top-k", min=1, help="Chunks retrieved into the prompt."),
    max_new_tokens: int = typer.Option(64, min=1, help="Answer length limit."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the answer and its statistics as JSON."),
) -> None:
    """Answer a question from the index built by `cacheblend ingest` (the answer streams, then its statistics)."""
    rag = rag_app(check_llama_index=False)  # the cheap checks of the input come first
    if strategy not in STRATEGIES:
        raise fail(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if not question.strip():
        raise fail('the question is empty; pass one in quotes: cacheblend ask "How tall is ...?"')
    folder = index_dir_or_default(index_dir, cache_dir)
    try:
        rag.read_manifest(folder)
    except rag.RagIndexError as exc:
        raise fail(str(exc)) from None
    rag_app()
    engine = load_engine(model, device, dtype, cache_dir)
    with console.status("loading the index ..."):
        index = rag.RagIndex.load(engine, folder)

    def show(piece: str) -> None:
        console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

    answer = index.ask(
        question, strategy=strategy, recompute_ratio=ratio, top_k=top_k, max_new_tokens=max_new_tokens, on_text=show
    )
    console.print()
    if answer.ttft_s is not None:
        blend = f"{strategy}, ratio {ratio:g}" if strategy == "cacheblend" else strategy
        console.print(
            f"[dim]TTFT {answer.ttft_s * 1000:.0f} ms ({blend}) · prompt {answer.prompt_tokens} tokens: "
            f"{answer.reused_tokens} reused, {answer.recomputed_tokens} recomputed · "
            f"{answer.cache_hits} chunk KV caches reused[/dim]",
            highlight=False,
        )
    sources = ", ".join(s["name"] + (f" ({s['score']:.2f})" if s["score"] is not None else "") for s in answer.sources)
    console.print(f"[dim]sources: {sources or 'none'}[/dim]", highlight=False)
    write_json(json_out, {**answer.as_dict(), "index_dir": str(folder)})
