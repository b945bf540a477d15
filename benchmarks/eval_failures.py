"""Per-example look at where a configuration's answer differs from full recompute's (from `cacheblend eval` JSON).

For each example where ``--config`` (default cacheblend@0.15) does not reproduce full recompute's answer, it
prints both answers, the gold answer, and the teacher-forced fidelity (top-1, KL), next to full_reuse's; then a
breakdown: how many mismatches are paraphrases (Rouge-L >= 0.5 with the reference), how many change whether the
gold answer is hit, and how many examples full_reuse already got right (so cacheblend lost them).

Usage: python benchmarks/eval_failures.py results/eval.json [--config cacheblend@0.15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def failures(result: dict, label: str, baseline: str = "full_reuse") -> dict:
    rows = {(r["example"], r["config"]): r for r in result["examples"]}
    examples = sorted({r["example"] for r in result["examples"]})
    if not any(r["config"] == label for r in result["examples"]):
        labels = sorted({r["config"] for r in result["examples"]})
        raise SystemExit(f"no rows for config {label!r} in the results; configs there: {', '.join(labels)}")
    out = []
    for ex in examples:
        mine, base = rows[(ex, label)], rows.get((ex, baseline))
        if mine["answer_em_vs_full"] >= 1.0:
            continue
        out.append(
            {
                "example": ex,
                "question": mine["question"],
                "gold": mine["gold"],
                "reference_answer": mine["reference_answer"],
                "answer": mine["answer"],
                "rouge_l_vs_full": mine["rouge_l_vs_full"],
                "top1": mine["top1_agreement"],
                "kl": mine["kl"],
                "gold_f1": mine["gold_f1"],
                "reference_gold_f1": rows[(ex, "full_recompute")]["gold_f1"],
                "baseline_answer": base["answer"] if base else None,
                "baseline_matches_full": bool(base and base["answer_em_vs_full"] >= 1.0),
                "baseline_top1": base["top1_agreement"] if base else None,
            }
        )
    same = [r for r in result["examples"] if r["config"] == label and r["answer_em_vs_full"] >= 1.0]
    summary = {
        "config": label,
        "examples": len(examples),
        "mismatches": len(out),
        "paraphrases": sum(f["rouge_l_vs_full"] >= 0.5 for f in out),
        "gold_f1_changed": sum(abs(f["gold_f1"] - f["reference_gold_f1"]) > 1e-9 for f in out),
        "reference_had_gold_f1_0": sum(f["reference_gold_f1"] == 0 for f in out),
        "baseline_was_right": sum(f["baseline_matches_full"] for f in out),
        "median_top1_mismatched": statistics.median(f["top1"] for f in out) if out else None,
        "median_top1_matched": statistics.median(r["top1_agreement"] for r in same) if same else None,
    }
    return {"summary": summary, "failures": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--config", default="cacheblend@0.15")
    parser.add_argument("--baseline", default="full_reuse")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = failures(json.loads(args.results.read_text()), args.config, args.baseline)
    for f in report["failures"]:
        print(f"#{f['example']}: {f['question']}  gold={f['gold']}")
        print(f"   full:       {f['reference_answer']!r}  (gold F1 {f['reference_gold_f1']:.2f})")
        print(
            f"   {args.config}: {f['answer']!r}  (Rouge-L {f['rouge_l_vs_full']:.2f}, top-1 {f['top1']:.2f}, "
            f"KL {f['kl']:.3f}, gold F1 {f['gold_f1']:.2f})"
        )
        print(f"   {args.baseline}: {f['baseline_answer']!r}  (top-1 {f['baseline_top1']:.2f})")
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
