"""Does computing each chunk's KV after other passages (instead of alone after the chunk prefix) keep answers?

CacheBlend computes a chunk alone: right after the chunk prefix, as if it were the prompt's first passage. In a
RAG prompt it stands among other passages. FusionRAG (Wang et al., 2026) computes each chunk after its most
similar chunks from the same index, so the stored KV already attends to what it is retrieved with. This script
measures, on questions with gold answers, how much of full recompute's gold F1 each way of precomputing keeps,
for ``full_reuse`` and ``cacheblend`` (query selection), on the questions full recompute answers (F1 >= 0.5),
one-passage and two-passage questions apart:

- ``alone``: today's chunks (computed after the chunk prefix only);
- ``similar:K``: after the K passages of the corpus most similar to it (MiniLM cosine), least similar first;
- ``lexical:K``: after its K lexically nearest passages (TF-IDF cosine over the model's token ids; no embedding
  model), least similar first: what ``engine.precompute(corpus)`` stores by default (K = 2);
- ``random:K``: after K other passages of the corpus picked at random (seeded by the chunk);
- ``fixed``: after one fixed, topic-free text (the same for every chunk): ``--fixed-text`` or a built-in one;
- ``retrieved:K``: after the K passages before it (cyclic) in the first prompt that holds it: what a retriever
  that computes each new document among the ones retrieved with it stores (``engine.attach``: the LangChain
  retriever, the LlamaIndex postprocessor), later prompts reusing that KV as it is;
- ``previous:K``: after the K passages before it (cyclic) in the corpus as the benchmark lists it (sorted by
  text, an order unrelated to content): what ``engine.precompute(corpus)`` stored by default before ``lexical``.

Every chunk of the corpus is precomputed once per way (the town corpus: 29 short documents), then every question
runs against those chunks. ``flops`` is the prefill's FLOPs over full recompute's (probe pass included).

    python benchmarks/context_precompute.py --model qwen2.5-coder-1.5b --ways alone,similar:2,random:2,fixed \\
        --out results/context_precompute.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.eval.datasets import load_examples
from cacheblend_rag.eval.metrics import best_over, f1_score
from cacheblend_rag.neighbours import nearest_texts

FIXED_TEXT = (
    "About these passages\n\nThe passages below were retrieved from a document collection for the question that "
    "follows them. Each passage is an excerpt of a longer document; passages are separated by blank lines, come in "
    "no particular order, and may repeat, overlap or disagree with one another. Some of them are not relevant to "
    "the question at all. Names, dates and numbers are given as the source documents state them.\n\n"
)
ANSWERED = 0.5  # gold F1 at which full recompute counts as answering a question


def question_kind(example) -> str:
    """ "one" or "two" passages needed, as the data says; "all" where it does not say."""
    if example.gold_passages is None:
        return "all"
    return "two" if example.gold_passages > 1 else "one"


def configs(ratio: float) -> dict[str, BlendConfig]:
    return {
        "full_reuse": BlendConfig(strategy="full_reuse"),
        f"query@{ratio:g}": BlendConfig(strategy="cacheblend", recompute_ratio=ratio),
    }


def previous(texts: list[str], i: int, k: int) -> list[str]:
    """The k texts before ``texts[i]``, cyclic, nearest last (``engine.attach(texts, context=k)``'s context for a new
    text; ``engine.precompute``'s default until it picked the lexically nearest)."""
    n = len(texts)
    return [texts[(i - j) % n] for j in range(min(k, n - 1), 0, -1)]


def contexts(
    way: str, passages: list[str], fixed_text: str, prompts: list[list[str]] | None = None, engine=None
) -> dict[str, list[str]]:
    """For every passage, the texts its KV is computed after (beyond the chunk prefix); ``prompts``: each example's
    passages in prompt order (for ``retrieved:K``); ``engine``: the engine (for ``lexical:K``)."""
    name, _, k = way.partition(":")
    if name == "alone":
        return {p: [] for p in passages}
    if name == "fixed":
        return {p: [fixed_text] for p in passages}
    k = int(k or 2)
    if name == "random":
        out = {}
        for p in passages:
            rng = random.Random(p)
            out[p] = rng.sample([q for q in passages if q != p], k)
        return out
    if name == "similar":
        return dict(zip(passages, nearest_texts(passages, k)))  # MiniLM cosine, least similar first
    if name == "lexical":
        return dict(zip(passages, engine.nearest_contexts(passages, k)))  # precompute(context=k)'s choice
    if name == "previous":
        return {p: previous(passages, i, k) for i, p in enumerate(passages)}
    if name == "retrieved":
        out = {}
        for group in prompts or []:
            for i, p in enumerate(group):
                out.setdefault(p, previous(group, i, k))
        return {p: out.get(p, []) for p in passages}
    raise SystemExit(
        f"unknown way {way!r}: use alone, fixed, similar:K, lexical:K, random:K, retrieved:K or previous:K"
    )


def precompute(engine, passages: list[str], context: dict[str, list[str]]) -> tuple[float, dict]:
    """Store every passage's KV computed after its context (``engine.precompute(context=...)``: the context is part
    of the key, so each way's KV has its own); returns (seconds, passage -> handle)."""
    start = time.perf_counter()
    handles = engine.precompute(passages, register=False, context=[context[p] for p in passages])
    return time.perf_counter() - start, dict(zip(passages, handles))


def answer(engine, segments, config: BlendConfig) -> dict:
    result = engine.generate(segments, config=config, max_new_tokens=24, stop=["\n"])
    return {
        "answer": result.text.strip(),
        "ttft_s": result.ttft_s,
        "flops": result.stats.prefill_flops,
        "recompute_ratio": result.stats.recompute_ratio,
    }


def kept(rows: list[dict], label: str, kind: str | None) -> dict:
    """Gold F1 of ``label`` over full recompute's, on the answered questions of one kind (None: all)."""
    mine = [r for r in rows if r["answered"] and (kind is None or r["kind"] == kind)]
    if not mine:
        return {"n": 0}
    ref = statistics.fmean(r["full_recompute"]["f1"] for r in mine)
    got = statistics.fmean(r[label]["f1"] for r in mine)
    return {"n": len(mine), "kept": got / ref if ref else None}


def summarize(rows: list[dict], labels: list[str]) -> list[dict]:
    out = []
    base = "alone/full_reuse"
    for label in labels:
        answered = [r for r in rows if r["answered"]]
        worse = [r["question"] for r in answered if base in r and r[label]["f1"] < r[base]["f1"] - 1e-9]
        out.append(
            {
                "config": label,
                "one": kept(rows, label, "one"),
                "two": kept(rows, label, "two"),
                "all": kept(rows, label, None),
                "worse_than_reuse": len(worse),
                "flops": statistics.fmean(r[label]["flops"] / r["full_recompute"]["flops"] for r in rows),
                "ttft_speedup": statistics.median(r["full_recompute"]["ttft_s"] for r in rows)
                / statistics.median(r[label]["ttft_s"] for r in rows),
            }
        )
    return out


def print_table(summary: list[dict], n: int) -> None:
    def pct(x: dict) -> str:
        return f"{100 * x['kept']:.0f}% ({x['n']})" if x.get("kept") is not None else "-"

    print(f"\n{n} questions; gold F1 kept vs full recompute on the questions it answers (count in brackets)")
    print(f"{'config':<28} {'one-passage':>12} {'two-passage':>12} {'all':>10} {'worse':>6} {'FLOPs':>6} {'TTFT':>6}")
    for s in summary:
        print(
            f"{s['config']:<28} {pct(s['one']):>12} {pct(s['two']):>12} {pct(s['all']):>10} "
            f"{s['worse_than_reuse']:>6} {s['flops']:>6.2f} {s['ttft_speedup']:>5.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument(
        "--data", default="town", help="'town' (the bundled questions) or a folder with questions.json and corpus/*.md"
    )
    parser.add_argument("--n", type=int, default=None, help="first n questions (default: all)")
    parser.add_argument("--ways", default="alone,lexical:2,similar:2,random:2,fixed")
    parser.add_argument("--ratio", type=float, default=0.15, help="cacheblend's recompute ratio")
    parser.add_argument("--fixed-text", default=FIXED_TEXT)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    engine = CacheBlendEngine.from_pretrained(args.model, dtype=args.dtype, store=["memory://?max_bytes=8GB"])
    examples = load_examples(args.data, args.n)
    corpus = sorted({p for e in examples for p in e.passages})
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    rows = [{"question": e.question, "gold": e.answers, "kind": question_kind(e)} for e in examples]
    for i, e in enumerate(examples):  # the reference
        segments = engine.chat_segments(e.user_segments())
        rows[i]["full_recompute"] = answer(engine, segments, BlendConfig(strategy="full_recompute"))
        rows[i]["full_recompute"]["f1"] = best_over(f1_score, rows[i]["full_recompute"]["answer"], e.answers)
        rows[i]["answered"] = rows[i]["full_recompute"]["f1"] >= ANSWERED
    labels, precompute_s = [], {}
    for way in ways:
        precompute_s[way], handles = precompute(
            engine, corpus, contexts(way, corpus, args.fixed_text, [e.passages for e in examples], engine)
        )
        for name, config in configs(args.ratio).items():
            label = f"{way}/{name}"
            labels.append(label)
            for i, e in enumerate(examples):
                segments = engine.chat_segments(e.user_segments([handles[p] for p in e.passages]))
                run = rows[i][label] = answer(engine, segments, config)
                run["f1"] = best_over(f1_score, run["answer"], e.answers)
            print(f"{label}: done ({time.strftime('%H:%M:%S')})", flush=True)
    summary = summarize(rows, labels)
    print_table(summary, len(examples))
    print("precompute seconds per way:", {k: round(v, 1) for k, v in precompute_s.items()})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows}
        args.out.write_text(json.dumps({**payload, "precompute_s": precompute_s}, indent=1))


if __name__ == "__main__":
    main()
