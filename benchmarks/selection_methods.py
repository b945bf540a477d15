"""Compare ways of choosing (and correcting) the cached tokens a blended prefill recomputes, at one budget.

Every method runs as a prefill plan on the same stored chunk KV; quality is measured against full recompute
by teacher forcing its greedy answer (mean KL over the answer tokens, top-1 agreement) and by the first
token's KL. Methods recompute a fixed set of cached rows at every layer ("fixed"), or are the engine's own
cacheblend selections run as requests: ``cacheblend`` (the paper's rule: V deviation at layer 1),
``cacheblend[attention]`` and ``cacheblend[query]``. Uses the research API of ``cacheblend_rag.engine``.

    python benchmarks/selection_methods.py --model qwen2.5-coder-0.5b --data ../shared/data/musique_dev.json --n 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.engine import attention_mass, reused_prompt, run_plan, teacher_force
from cacheblend_rag.eval.datasets import load_examples


class MassProbe:
    """Attention mass each key receives from the probe rows (uncached rows after the first chunk), per layer."""

    def __init__(self, engine, probe_start: int, n: int) -> None:
        self.probe_start, self.scale = probe_start, engine.model_forward.scale
        self.mass = torch.zeros(engine.model_forward.n_layers, n)

    def __call__(self, layer, q, rows, keys) -> None:
        mask = rows >= self.probe_start
        if mask.any():
            m = attention_mass(q[:, mask], rows[mask], keys, self.scale)
            self.mass[layer] = m.float().cpu() / (q.shape[0] * int(mask.sum()))


def score(make, targets: list[int]) -> tuple[torch.Tensor, float]:
    """Log-probs [T, V] along ``targets`` after the prefill ``make(room)`` runs, and the prefill time."""
    t = time.perf_counter()
    run = make(len(targets) + 1)
    elapsed = time.perf_counter() - t
    return teacher_force(run, targets), elapsed


def greedy(engine, plan, max_new: int) -> list[int]:
    run = run_plan(engine, plan, extra_capacity=max_new + 1)
    out, logits = [], run.logits
    for _ in range(max_new):
        token = int(logits.argmax())
        out.append(token)
        if token in engine.eos_token_ids or "\n" in engine.tokenizer.decode(out, skip_special_tokens=True):
            break
        logits = run.decode(token)
    return out


def study(engine, example, args, rng) -> dict:
    segments = example.prompt(engine, args.k)
    prompt = reused_prompt(engine, segments)
    spans, offset, rows = prompt.spans, prompt.offsets, prompt.rows
    n = prompt.n
    full_plan = prompt.full_plan()
    targets = greedy(engine, full_plan, args.max_new_tokens)
    ref, full_s = score(lambda room: run_plan(engine, full_plan, room), targets)
    budget = round(args.ratio * rows.numel())

    def top(s: torch.Tensor, among: torch.Tensor = rows, k: int = budget) -> torch.Tensor:
        return among[s[among].topk(min(k, among.numel())).indices]

    heads = rows[offset[rows] < 4]  # EPIC: each chunk's first 4 tokens
    rest = rows[offset[rows] >= 4]

    probe = MassProbe(engine, spans[0].start, n)
    t = time.perf_counter()
    run_plan(engine, prompt.plan(observe=probe))
    probe_s = time.perf_counter() - t
    mass = probe.mass
    norm = mass / mass[:, rows].sum(1, keepdim=True).clamp_min(1e-12)  # share of each layer's chunk mass
    sets = {
        "random": rows[torch.randperm(rows.numel(), generator=rng)[:budget]],
        "chunk_heads": rows[offset[rows] < max(1, budget // len(spans))],
        "query_sum": top(norm.sum(0)),
        "query_max": top(norm.max(0).values),
        "query_deep": top(norm[norm.shape[0] // 2 :].sum(0)),
        "query_deep+heads": torch.cat([heads, top(norm[norm.shape[0] // 2 :].sum(0), rest, budget - heads.numel())]),
    }
    plans = {"full_reuse": prompt.plan()}
    for name, chosen in sets.items():
        plans[f"fixed:{name}"] = prompt.plan(chosen)
    methods = {name: (lambda room, plan=plan: run_plan(engine, plan, room)) for name, plan in plans.items()}
    # the engine's own selections, as a request runs them (chunk reads and the probe pass included in the time)
    for name, selection in (
        ("cacheblend", "deviation"),
        ("cacheblend[attention]", "attention"),
        ("cacheblend[query]", "query"),
    ):
        config = BlendConfig(selection=selection, recompute_ratio=args.ratio, exact_when_faster=False)
        methods[name] = lambda room, config=config: engine.prepare(segments, config=config, extra_capacity=room)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods or k == "full_reuse"}
    out = {
        "prompt_tokens": n,
        "cached_tokens": int(rows.numel()),
        "answer_tokens": len(targets),
        "full_prefill_s": full_s,
        "probe_s": probe_s,
        "methods": {},
    }
    for name, make in methods.items():
        lp, elapsed = score(make, targets)
        kl = (ref.exp() * (ref - lp)).sum(-1)
        out["methods"][name] = {
            "kl": float(kl.mean()),
            "kl_first": float(kl[0]),
            "prefill_s": elapsed,
            "top1": float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--skip", type=int, default=0, help="start at this example")
    parser.add_argument("--k", type=int, default=None, help="passages per prompt (default all)")
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--chunk-prefix", default=None, help="text chunks are computed after (default: engine's)")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods (default all)")
    parser.add_argument("--out", default="results/selection_methods.json")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    rng = torch.Generator().manual_seed(0)
    engine = CacheBlendEngine.from_pretrained(
        args.model, store=["memory://?max_bytes=16GB"], chunk_prefix=args.chunk_prefix
    )
    examples = load_examples(args.data, args.skip + args.n)[args.skip :]
    results = []
    for i, example in enumerate(examples):
        r = study(engine, example, args, rng)
        results.append(r)
        best = sorted(r["methods"].items(), key=lambda kv: kv[1]["kl"])[:4]
        reuse_kl = r["methods"]["full_reuse"]["kl"]
        print(
            f"example {args.skip + i}: {r['prompt_tokens']} tokens, full_reuse KL {reuse_kl:.3f}; "
            + ", ".join(f"{k} {v['kl']:.3f}" for k, v in best),
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "examples": results}))
    print(f"\n{len(results)} examples, ratio {args.ratio}: means (answer KL, first-token KL, top-1, prefill s)")
    ref = [r["methods"]["full_reuse"]["kl"] for r in results]
    for name in results[0]["methods"]:
        m = [r["methods"][name] for r in results]
        kl = statistics.fmean(x["kl"] for x in m)
        wins = sum(x["kl"] < f for x, f in zip(m, ref))
        first, top1 = statistics.fmean(x["kl_first"] for x in m), statistics.fmean(x["top1"] for x in m)
        print(
            f"  {name:26s} KL {kl:.3f} ({kl / statistics.fmean(ref):.0%} of full_reuse, lower on {wins}/{len(m)})"
            f"  first {first:.3f}  top-1 {top1:.3f}  {statistics.median(x['prefill_s'] for x in m):.2f}s"
        )
    print(
        f"  full prefill {statistics.median(r['full_prefill_s'] for r in results):.2f}s, "
        f"probe {statistics.median(r['probe_s'] for r in results):.2f}s"
    )


if __name__ == "__main__":
    main()
