"""Evaluation data: MuSiQue-style examples and the paper's prompt layout (each passage one chunk)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..store.chunk import ChunkHandle

PREFIX = (
    "You will be asked a question after reading several passages. Please directly answer the question based on "
    "the given passages. Do NOT repeat the question. The answer should be within 5 words.\nPassages:\n"
)
QUERY = (
    "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. The answer should "
    "be within 5 words.\nQuestion: {question}\nAnswer:"
)


class DataError(ValueError):
    """An evaluation data file is missing or malformed; the message names the file and the problem."""


@dataclass
class Example:
    question: str
    passages: list[str]  # chunk texts, each ``{title}\n\n{text}\n\n``
    answers: list[str]

    def query(self) -> str:
        q = self.question.strip()
        return QUERY.format(question=q if q.endswith("?") else q + "?")

    def user_segments(self, handles: list[ChunkHandle] | None = None) -> list:
        """The user message as segments: prefix, one chunk per passage (handles if given), query."""
        chunks = handles if handles is not None else self.passages
        return [PREFIX, *chunks, self.query()]

    def prompt(self, engine, k: int | None = None) -> list:
        """The chat-wrapped segments of this example with its first ``k`` passages (all by default) as
        precomputed chunks: what every benchmark sends to ``engine.generate``."""
        return engine.chat_segments(self.user_segments(engine.precompute(self.passages[:k])))


def load_examples(path: str | Path, n: int | None = None) -> list[Example]:
    """Read a MuSiQue-style JSON list: items with ``ctxs`` [{title, text}], ``question``, ``answers``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass --data with the path to e.g. musique_dev.json")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); it must be a list of examples") from exc
    if not isinstance(items, list) or not items:
        raise DataError(f"{path} must hold a non-empty JSON list of examples, got {type(items).__name__}")
    examples = []
    for i, item in enumerate(items[:n] if n is not None else items):
        examples.append(_example(path, i, item))
    return examples


def _example(path: Path, i: int, item: object) -> Example:
    where = f"{path}, example {i}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with ctxs, question, answers; got {type(item).__name__}")
    missing = [k for k in ("ctxs", "question", "answers") if k not in item]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    ctxs, question, answers = item["ctxs"], item["question"], item["answers"]
    if not isinstance(ctxs, list) or not ctxs:
        raise DataError(f"{where}: 'ctxs' must be a non-empty list of passages")
    passages = []
    for j, ctx in enumerate(ctxs):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str) or not ctx["text"].strip():
            raise DataError(f"{where}: ctxs[{j}] must be an object with a non-empty 'text'")
        passages.append(f"{ctx.get('title') or ''}\n\n{ctx['text']}\n\n")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: 'answers' must be a list of strings")
    return Example(question=question, passages=passages, answers=answers)
