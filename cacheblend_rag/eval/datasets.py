"""Evaluation data in the paper's prompt layout (each passage one chunk).

Four sources: a MuSiQue-style JSON file (``ctxs``, ``question``, ``answers``), a folder of 2WikiMQA-style
samples (``0``, ``1``, ... chunk texts, ``query``; no gold answers), ``town``: questions over the bundled
Port Merrow corpus (cacheblend_rag/data/town_questions.json) whose answers the corpus holds, each asked with its
documents among distractors, so that a small model can answer them and gold F1 means something, and any folder laid
out as that one: ``questions.json`` (the same schema) beside ``corpus/*.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..neighbours import Embed, nearest_texts
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
    answers: list[str]  # empty: no gold answer (fidelity to full recompute only)
    query_text: str | None = None  # the text after the passages, when the data gives it whole
    gold_passages: int | None = None  # how many passages the answer needs (1: one-passage, 2+: cross-chunk), if known

    def query(self) -> str:
        if self.query_text is not None:
            return self.query_text
        q = self.question.strip()
        return QUERY.format(question=q if q.endswith("?") else q + "?")

    def user_segments(self, handles: list[ChunkHandle] | None = None) -> list:
        """The user message as segments: prefix, one chunk per passage (handles if given), query."""
        chunks = handles if handles is not None else self.passages
        return [PREFIX, *chunks, self.query()]

    def prompt(self, engine, k: int | None = None, context: Mapping[str, Sequence[str]] | None = None) -> list:
        """The chat-wrapped segments of this example with its first ``k`` passages (all by default) as
        precomputed chunks: what every benchmark sends to ``engine.generate``.

        context: None (each chunk computed alone) or, for every passage text, the texts its KV is computed after
        (``passage_contexts``), trimmed by ``engine.chunk_contexts``."""
        passages = self.passages[:k]
        if context is None:
            return engine.chat_segments(self.user_segments(engine.precompute(passages, context=0)))
        missing = [i for i, p in enumerate(passages) if p not in context]
        if missing:
            raise ValueError(f"context has no entry for passage {missing[0]} of {self.question!r}")
        handles = engine.precompute(passages, context=engine.chunk_contexts(passages, [context[p] for p in passages]))
        return engine.chat_segments(self.user_segments(handles))


def passage_contexts(
    examples: Sequence[Example], k: int, engine=None, embed: Embed | None = None
) -> dict[str, list[str]]:
    """For every distinct passage of ``examples`` (the corpus), the texts of its ``k`` nearest passages of that
    corpus, least similar first: the context its KV is computed after (k = 0: none, each chunk alone). By default the
    lexically nearest, as ``engine.precompute(corpus, context=k)`` picks them (``engine.nearest_contexts``); with
    ``embed`` (N texts -> [N, E]; e.g. ``neighbours.minilm_embeddings``) the nearest by embedding, the corpus
    embedded once."""
    corpus = list(dict.fromkeys(p for e in examples for p in e.passages))
    if embed is not None:
        return dict(zip(corpus, nearest_texts(corpus, k, embed)))
    if engine is None:
        raise ValueError("passage_contexts needs the engine (lexical neighbours) or embed (neighbours by embedding)")
    return dict(zip(corpus, engine.nearest_contexts(corpus, k)))


TOWN = "town"
TOWN_DOCUMENTS = 10  # documents per town prompt: the ones holding the answer, then distractors
QUESTIONS = "questions.json"  # in a corpus folder, beside corpus/*.md


def load_examples(path: str | Path, n: int | None = None) -> list[Example]:
    """Examples from ``town``, a folder with ``questions.json`` and ``corpus/*.md`` (as the town's), a folder of
    2WikiMQA-style samples, or a MuSiQue-style JSON list (items with ``ctxs`` [{title, text}], ``question``,
    ``answers``); the first ``n``."""
    if str(path) == TOWN:
        return town_examples()[:n]
    path = Path(path)
    if path.is_dir() and (path / QUESTIONS).is_file():
        return corpus_examples(path / QUESTIONS, path / "corpus")[:n]
    if path.is_dir():
        return _wikimqa_examples(path)[:n]
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}; pass --data with a MuSiQue-style JSON file (e.g. musique_dev.json), "
            f"a folder of wikimqa samples, or '{TOWN}' for the bundled questions"
        )
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


def _wikimqa_examples(folder: Path) -> list[Example]:
    files = sorted(folder.glob("*.json"), key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0))
    if not files:
        raise DataError(f"{folder} holds no .json samples; pass a folder of wikimqa samples (1.json, 2.json, ...)")
    examples = []
    for file in files:
        try:
            item = json.loads(file.read_text(encoding="utf-8"))
            count = int(item["chunk_num"])
            chunks = [item[str(i)] for i in range(count)]
            query = item["query"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{file}: not a wikimqa sample ({type(exc).__name__}: {exc}); it needs 'chunk_num', "
                "chunks '0'..'n-1' and 'query'"
            ) from None
        if not all(isinstance(c, str) and c.strip() for c in chunks) or not isinstance(query, str):
            raise DataError(f"{file}: chunks and 'query' must be non-empty strings")
        question = query.rsplit("Question:", 1)[-1].removesuffix("Answer:").strip()
        examples.append(Example(question=question, passages=chunks, answers=[], query_text=query))
    return examples


def town_examples(documents: int = TOWN_DOCUMENTS) -> list[Example]:
    """The bundled town questions, each with the documents that answer it followed by distractors (chosen and
    ordered by a fixed seed per question), one chunk per document."""
    data = Path(__file__).resolve().parents[1] / "data"
    return corpus_examples(data / "town_questions.json", data / "corpus", documents)


def corpus_examples(questions: Path, corpus_dir: Path, documents: int = TOWN_DOCUMENTS) -> list[Example]:
    """Questions over a folder of documents (``questions``: {"questions": [{question, answers, documents}]}, the
    documents named by file name in ``corpus_dir``), each asked with its documents among distractors of the same
    corpus, chosen and ordered by a fixed seed per question: ``documents`` chunks a prompt, one per document."""
    import random

    corpus = {p.name: p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.md"))}
    try:
        spec = json.loads(questions.read_text(encoding="utf-8"))
        items = spec["questions"]
        names = [list(item["documents"]) for item in items]
        pairs = [(item["question"], list(item["answers"])) for item in items]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"{questions}: not a questions file ({type(exc).__name__}: {exc}); it needs "
            '{"questions": [{"question": ..., "answers": [...], "documents": ["name.md", ...]}]}'
        ) from None
    for i, (needed, (question, answers)) in enumerate(zip(names, pairs)):
        if not isinstance(question, str) or not question.strip() or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{questions}, question {i}: 'question' must be a non-empty string, 'answers' strings")
        if not 1 <= len(needed) <= documents:
            raise DataError(f"{questions}, question {i}: 'documents' must name 1 to {documents} files of the corpus")
    missing = sorted({name for needed in names for name in needed if name not in corpus})
    if missing:
        raise DataError(f"{questions} names documents that {corpus_dir} lacks: {', '.join(missing[:5])}")
    if len(corpus) < documents:
        raise DataError(f"{corpus_dir} holds {len(corpus)} .md documents; a prompt needs {documents}")
    examples = []
    for i, (needed, (question, answers)) in enumerate(zip(names, pairs)):
        rng = random.Random(i)
        others = [name for name in corpus if name not in needed]
        chosen = needed + rng.sample(others, documents - len(needed))
        rng.shuffle(chosen)
        examples.append(
            Example(
                question=question,
                passages=[f"{corpus[name].strip()}\n\n" for name in chosen],
                answers=answers,
                gold_passages=len(needed),
            )
        )
    return examples
