"""The RAG part of ``cacheblend demo``: the sample corpus indexed, questions answered under two strategies.

Each question is asked through the LlamaIndex query engine twice, under ``full_recompute`` (the reference:
the whole prompt is prefilled) and ``cacheblend`` (every retrieved chunk's stored KV is reused, a fraction of
its tokens recomputed). ``similarity_top_k`` chunks of ~200 tokens make prompts of ~1,700-1,900 tokens, long
enough for the prefill to dominate the time to first token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

from .documents import read_documents, sample_corpus
from .index import DEFAULT_TOP_K, RagIndex

STRATEGY_PAIR = ("full_recompute", "cacheblend")


@dataclass(frozen=True)
class CorpusQuestion:
    """A question about the sample corpus, the answer it expects, and the documents that hold the answer."""

    question: str
    expected: str
    documents: tuple[str, ...]

    def is_correct(self, answer: str) -> bool:
        """Whether ``answer`` contains the expected answer as whole words (case and spacing ignored)."""
        words = r"\s+".join(re.escape(w) for w in self.expected.lower().split())
        return re.search(rf"(?<!\w){words}(?!\w)", " ".join(answer.lower().split())) is not None


QUESTIONS = (
    CorpusQuestion("How tall is the Greyhook Lighthouse?", "31", ("greyhook-lighthouse.md",)),
    CorpusQuestion("Who is the curator of the Maritime Museum?", "Ilse Varga", ("maritime-museum.md",)),
    CorpusQuestion("Who is the mayor of Port Merrow?", "Nadia Ferreira", ("tidehall.md",)),
    CorpusQuestion("Which beer honours Ada Pell?", "Keeper's Ale", ("ada-pell.md", "greyhook-brewery.md")),
    CorpusQuestion(
        "Ada Pell was born on an island. How long does the ferry to that island take?",
        "55 minutes",
        ("ada-pell.md", "sable-island-ferry.md"),
    ),
)


def build_sample_index(engine, progress: bool = False) -> RagIndex:
    """The bundled corpus, indexed in memory, every chunk's KV computed (or found) in the engine's store."""
    return RagIndex.build(engine, read_documents(sample_corpus()), progress=progress)


def rag_rows(
    index: RagIndex,
    questions: tuple[CorpusQuestion, ...] = QUESTIONS,
    *,
    ratio: float = 0.15,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = 32,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (question, strategy): the answer, whether it is right, TTFT and reuse statistics."""
    if questions:
        # untimed warm-up: the first request of a process pays one-time costs that would inflate one TTFT
        index.ask(questions[0].question, strategy="full_recompute", top_k=top_k, max_new_tokens=1)
    rows = []
    for item in questions:
        for strategy in STRATEGY_PAIR:
            answer = index.ask(
                item.question, strategy=strategy, recompute_ratio=ratio, top_k=top_k, max_new_tokens=max_new_tokens
            )
            row = {
                "question": item.question,
                "expected": item.expected,
                "documents": list(item.documents),
                "strategy": strategy,
                "answer": answer.text,
                "correct": item.is_correct(answer.text),
                "ttft_s": answer.ttft_s,
                "prompt_tokens": answer.prompt_tokens,
                "reused_tokens": answer.reused_tokens,
                "recomputed_tokens": answer.recomputed_tokens,
                "cache_hits": answer.cache_hits,
                "sources": [s["name"] for s in answer.sources],
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per strategy: median TTFT, share of prompt tokens reused, answers right; cacheblend's speedup and agreement."""
    out: dict = {}
    for strategy in STRATEGY_PAIR:
        mine = [r for r in rows if r["strategy"] == strategy]
        if not mine:
            continue
        prompt = sum(r["prompt_tokens"] for r in mine)
        out[strategy] = {
            "median_ttft_s": median(r["ttft_s"] for r in mine),
            "reuse_fraction": sum(r["reused_tokens"] for r in mine) / prompt if prompt else 0.0,
            "correct": sum(r["correct"] for r in mine),
            "questions": len(mine),
        }
    if len(out) == 2:
        full, blend = out["full_recompute"], out["cacheblend"]
        out["speedup"] = full["median_ttft_s"] / blend["median_ttft_s"] if blend["median_ttft_s"] else None
        answers = {}
        for r in rows:
            answers.setdefault(r["question"], {})[r["strategy"]] = r["answer"]
        out["same_answer_as_full_recompute"] = sum(a["cacheblend"] == a["full_recompute"] for a in answers.values())
        correct: dict = {}
        for r in rows:
            correct.setdefault(r["question"], {})[r["strategy"]] = r["correct"]
        # the facts full recompute finds and cacheblend does not: what a user would lose
        out["missed_by_cacheblend"] = [
            q for q, c in correct.items() if c.get("full_recompute") and not c.get("cacheblend")
        ]
    return out
