"""Which recompute share keeps answers, and would a guard on the first token catch the answers blending spoils?

For every question (town: gold answers, one- and two-passage questions), each passage's KV computed after its 2
nearest passages of the corpus (what ``cacheblend ingest`` stores), this script answers with full recompute,
full_reuse and the query selection at several shares, and records each answer's first-token distribution.

It then reports, per share, the gold F1 kept on the questions full recompute answers (F1 >= 0.5), one- and
two-passage apart, the answers worse than full_reuse's and the TTFT speedup; and, per guard rule, how often the
rule fires, what escalating those requests to a larger share would keep, and what it costs in mean TTFT. A guard
sees only what the engine sees before answering: the blend's first-token distribution and full_reuse's (the query
selection's probe pass computes it anyway); the reference never decides.

    python benchmarks/blend_guard.py --model qwen2.5-coder-1.5b --ratios 0.05,0.1,0.15 --escalate 0.5 \\
        --out results/blend_guard.json

``--selections query,bridge`` answers with each selection at each share; ``--reference`` reuses full recompute's
answers and TTFTs from an earlier run of the same model, and full_reuse's where that run computed the chunks the same
``--way`` (its TTFT speedups then compare runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from context_precompute import ANSWERED, contexts, precompute, question_kind

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.eval.datasets import load_examples
from cacheblend_rag.eval.metrics import best_over, f1_score

MAX_NEW_TOKENS = 24


def answer(engine, segments, config: BlendConfig) -> dict:
    """Greedy answer (to the first newline) with its first token, that token's probability and the TTFT."""
    req = engine.prepare(segments, config=config, extra_capacity=MAX_NEW_TOKENS + 1)
    ttft = time.perf_counter() - req.started
    probs = torch.softmax(req.logits.float(), dim=-1)
    first = int(probs.argmax())
    tokens, logits = [], req.logits
    for _ in range(MAX_NEW_TOKENS):
        token = int(logits.argmax())
        tokens.append(token)
        if token in engine.eos_token_ids or "\n" in engine.tokenizer.decode(tokens, skip_special_tokens=True):
            break
        logits = req.decode(token)
    text = engine.tokenizer.decode([t for t in tokens if t not in engine.eos_token_ids], skip_special_tokens=True)
    return {
        "answer": text.split("\n")[0].strip(),
        "first": first,
        "p_first": float(probs[first]),
        "ttft_s": ttft,
        "fallback": req.stats.as_dict().get("fallback"),
    }


def load_reference(path: Path | None, args) -> tuple[list[dict] | None, tuple[str, ...]]:
    """The rows of an earlier run and the answers to take from it: refused unless it ran the same model; full
    recompute's answers depend on nothing else, full_reuse's also on how the chunks were computed (taken only from
    a run of the same way)."""
    if path is None:
        return None, ()
    earlier = json.loads(path.read_text())
    ran = earlier.get("args", {})
    if ran.get("model") != str(args.model):
        raise SystemExit(
            f"--reference {path} ran --model {ran.get('model')!r}, this run {args.model!r}: "
            "give a run of the same model"
        )
    same_way = ran.get("way") == str(args.way)
    return earlier["rows"], ("full_recompute", "full_reuse") if same_way else ("full_recompute",)


def kept(rows: list[dict], pick, kind: str | None) -> dict:
    """Gold F1 of the answers ``pick(row)`` chooses over full recompute's, on the answered questions of a kind."""
    mine = [r for r in rows if r["answered"] and (kind is None or r["kind"] == kind)]
    if not mine:
        return {"n": 0, "kept": None}
    ref = statistics.fmean(r["full_recompute"]["f1"] for r in mine)
    return {"n": len(mine), "kept": statistics.fmean(pick(r)["f1"] for r in mine) / ref if ref else None}


def guard_rules(threshold: float) -> dict:
    """Rules that see only the blend's and full_reuse's first-token distributions."""
    return {
        "none": lambda blend, reuse: False,
        "disagree": lambda blend, reuse: blend["first"] != reuse["first"],
        f"unsure<{threshold:g}": lambda blend, reuse: blend["p_first"] < threshold,
        f"disagree|unsure<{threshold:g}": lambda blend, reuse: (
            blend["first"] != reuse["first"] or blend["p_first"] < threshold
        ),
    }


def summarize(rows: list[dict], ratios: list[str], escalations: list[str], threshold: float) -> list[dict]:
    base_ttft = statistics.fmean(r["full_recompute"]["ttft_s"] for r in rows)
    out = []
    rules = [("none", "none", guard_rules(threshold)["none"])]
    rules += [
        (name, to, fires) for to in escalations for name, fires in guard_rules(threshold).items() if name != "none"
    ]
    for label in ratios:
        for name, escalate, fires in rules:

            def pick(r, label=label, fires=fires, escalate=escalate):
                return r[escalate] if fires(r[label], r["full_reuse"]) else r[label]

            fired = [r for r in rows if fires(r[label], r["full_reuse"])]
            cost = statistics.fmean(
                r[label]["ttft_s"] + (r[escalate]["ttft_s"] if fires(r[label], r["full_reuse"]) else 0.0) for r in rows
            )
            answered = [r for r in rows if r["answered"]]
            out.append(
                {
                    "config": label,
                    "guard": name if name == "none" else f"{name} -> {escalate}",
                    "fires": len(fired),
                    "fired_wrong_first": sum(r[label]["first"] != r["full_recompute"]["first"] for r in fired),
                    "missed_wrong_first": sum(
                        r[label]["first"] != r["full_recompute"]["first"] for r in rows if r not in fired
                    ),
                    "one": kept(rows, pick, "one"),
                    "two": kept(rows, pick, "two"),
                    "all": kept(rows, pick, None),
                    "worse_than_reuse": sum(pick(r)["f1"] < r["full_reuse"]["f1"] - 1e-9 for r in answered),
                    "ttft_speedup": base_ttft / cost,
                }
            )
    return out


def print_table(summary: list[dict], n: int) -> None:
    def pct(x: dict) -> str:
        return f"{100 * x['kept']:.0f}% ({x['n']})" if x.get("kept") is not None else "-"

    print(f"\n{n} questions; gold F1 kept vs full recompute on the questions it answers (count); mean-TTFT speedup")
    head = f"{'config':<12} {'guard':<40} {'fires':>5} {'hit':>4} {'miss':>4}"
    print(f"{head} {'one-passage':>12} {'two-passage':>12} {'all':>10} {'worse':>6} {'TTFT':>6}")
    for s in summary:
        print(
            f"{s['config']:<12} {s['guard']:<40} {s['fires']:>5} {s['fired_wrong_first']:>4} "
            f"{s['missed_wrong_first']:>4} {pct(s['one']):>12} {pct(s['two']):>12} {pct(s['all']):>10} "
            f"{s['worse_than_reuse']:>6} {s['ttft_speedup']:>5.1f}x"
        )
    print("hit: fired where the blend's first token differs from full recompute's; miss: differs, did not fire")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument(
        "--data",
        default="town",
        help="'town' (the bundled questions) or a folder with questions.json and corpus/*.md (benchmarks/data/valley)",
    )
    parser.add_argument("--n", type=int, default=None, help="first n questions (default: all)")
    parser.add_argument("--way", default="similar:2", help="how chunks are precomputed (context_precompute.py)")
    parser.add_argument("--ratios", default="0.05,0.1,0.15", help="shares to answer with")
    parser.add_argument("--selections", default="query", help="cacheblend selections to answer with (query, bridge)")
    parser.add_argument("--escalate", type=float, default=0.5, help="the share a guarded request escalates to")
    parser.add_argument("--threshold", type=float, default=0.5, help="first-token probability below which 'unsure'")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="take full recompute's answers (and TTFTs) from this earlier run of the same model, and full_reuse's "
        "where it ran the same --way",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    engine = CacheBlendEngine.from_pretrained(args.model, store=["memory://?max_bytes=8GB"])
    examples = load_examples(args.data, args.n)
    kinds = [question_kind(e) for e in examples]
    corpus = sorted({p for e in examples for p in e.passages})
    _, handles = precompute(engine, corpus, contexts(args.way, corpus, "", [e.passages for e in examples], engine))
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    configs = {
        "full_recompute": BlendConfig(strategy="full_recompute"),
        "full_reuse": BlendConfig(strategy="full_reuse"),
    }
    selections = [s.strip() for s in args.selections.split(",") if s.strip()]
    labels = [f"{selection}@{r:g}" for selection in selections for r in ratios]
    for label in [*labels, f"query@{args.escalate:g}"]:
        selection, _, r = label.partition("@")
        configs[label] = BlendConfig(
            strategy="cacheblend", selection=selection, recompute_ratio=float(r), exact_when_faster=False
        )
    reference, taken = load_reference(args.reference, args)
    rows = []
    for i, e in enumerate(examples):
        segments = engine.chat_segments(e.user_segments([handles[p] for p in e.passages]))
        row = {"question": e.question, "gold": e.answers, "kind": kinds[i]}
        for label, config in configs.items():
            if label in taken:
                if i >= len(reference) or reference[i]["question"] != e.question:
                    raise SystemExit(f"--reference row {i} is another question: give a run of the same questions")
                row[label] = reference[i][label]
                continue
            row[label] = answer(engine, segments, config)
            row[label]["f1"] = best_over(f1_score, row[label]["answer"], e.answers)
        row["answered"] = row["full_recompute"]["f1"] >= ANSWERED
        rows.append(row)
        print(f"{i + 1}/{len(examples)} done ({time.strftime('%H:%M:%S')})", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
            )
    summary = summarize(rows, labels, [f"query@{args.escalate:g}", "full_recompute"], args.threshold)
    print_table(summary, len(rows))
    if args.out:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
