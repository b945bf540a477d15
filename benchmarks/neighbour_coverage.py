"""How often does a chunk's context hold the other passage its two-passage questions need?

A question that needs two documents (a bridge: the first names the entity, the second holds the asked fact) is the
cross-chunk case: the blend must restore attention between them. A chunk computed after the other document already
attends to it, so how often each way of choosing a chunk's context (``context_precompute.py``'s ways) puts the
question's other gold document among it says what that way can give the bridge. No answer is generated: the
contexts only (the model's tokenizer for ``lexical:K``). Counts every (question, gold document) pair of the
questions naming two or more documents: a hit when another of the question's documents is in that document's context.

    python benchmarks/neighbour_coverage.py --data benchmarks/data/valley --ways lexical:2,similar:2,previous:2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from context_precompute import contexts

import cacheblend_rag
from cacheblend_rag import CacheBlendEngine

TOWN_DATA = Path(cacheblend_rag.__file__).parent / "data"  # town_questions.json beside corpus/


def documents(data: str) -> tuple[dict[str, str], list[list[str]]]:
    """(document name -> its passage text as a prompt holds it, the documents of each question)."""
    folder = TOWN_DATA if data == "town" else Path(data)
    questions = folder / ("town_questions.json" if data == "town" else "questions.json")
    corpus = {p.name: f"{p.read_text(encoding='utf-8').strip()}\n\n" for p in sorted((folder / "corpus").glob("*.md"))}
    needed = [list(item["documents"]) for item in json.loads(questions.read_text(encoding="utf-8"))["questions"]]
    return corpus, needed


def coverage(context: dict[str, list[str]], corpus: dict[str, str], needed: list[list[str]]) -> tuple[int, int]:
    """(pairs whose document has another of its question's documents in its context, pairs)."""
    hits = pairs = 0
    for names in needed:
        if len(names) < 2:
            continue
        for name in names:
            pairs += 1
            hits += any(corpus[other] in context[corpus[name]] for other in names if other != name)
    return hits, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="whose tokenizer lexical:K reads")
    parser.add_argument("--data", default="town", help="'town' or a folder with questions.json and corpus/*.md")
    parser.add_argument("--ways", default="lexical:2,similar:2,random:2,previous:2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    engine = CacheBlendEngine.from_pretrained(args.model, store=["memory://"])
    corpus, needed = documents(args.data)
    passages = sorted(corpus.values())
    rows = []
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if any(w.startswith("retrieved") for w in ways):
        raise SystemExit("retrieved:K depends on the prompts' order: measure it with context_precompute.py")
    for way in ways:
        hits, pairs = coverage(contexts(way, passages, "", None, engine), corpus, needed)
        rows.append({"way": way, "hits": hits, "pairs": pairs})
        print(f"{way:14s} the other gold document in the context: {hits} of {pairs} (two-document questions)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
