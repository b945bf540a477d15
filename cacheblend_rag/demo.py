"""The strategy demo: multi-chunk questions answered under every strategy, printed as one table."""

from __future__ import annotations

from dataclasses import dataclass

from .config import STRATEGIES, BlendConfig


@dataclass(frozen=True)
class DemoQuestion:
    chunks: tuple[str, ...]
    question: str


DEMO_QUESTIONS = (
    DemoQuestion(
        ("Lionel Messi scored 13 goals at FIFA World Cups.", "Cristiano Ronaldo scored 8 goals at FIFA World Cups."),
        "Who scored more goals at FIFA World Cups, Messi or Ronaldo?",
    ),
    DemoQuestion(
        ("Marie Curie was born in Warsaw in 1867.", "Warsaw is the capital and largest city of Poland."),
        "In which country was Marie Curie born?",
    ),
    DemoQuestion(
        (
            "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
            "The Statue of Liberty was dedicated in New York Harbor in 1886.",
            "The Golden Gate Bridge opened to traffic in 1937.",
        ),
        "In which year was the Eiffel Tower completed?",
    ),
)
INSTRUCTION = "Answer the question in one short sentence using only the passages.\nPassages:\n"


def strategy_rows(engine, questions=DEMO_QUESTIONS, ratio: float = 0.15, max_new_tokens: int = 32) -> list[dict]:
    """Answer every question under every strategy; one row per (question, strategy)."""
    rows = []
    for item in questions:
        handles = engine.precompute(list(item.chunks))
        parts = [INSTRUCTION]
        for handle in handles:
            parts += [handle, "\n"]
        segments = engine.chat_segments([*parts, f"Question: {item.question}"])
        for strategy in STRATEGIES:
            result = engine.generate(
                segments, max_new_tokens=max_new_tokens, config=BlendConfig(strategy=strategy, recompute_ratio=ratio)
            )
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
                }
            )
    return rows
