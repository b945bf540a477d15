"""Is a chunk's stored KV still good after another start of the prompt than the one it was computed after?

Chunks are computed after the chunk prefix (the chat template's start with its default system prompt). Apps set
their own system prompt, or send no template at all. For each example this measures, against full recompute of
the same prompt (mean KL over full recompute's first greedy answer tokens, teacher-forced, and whether the greedy
answer is the same), ``full_reuse`` and ``cacheblend`` (the default query selection at 0.15) when the prompt
starts:

- ``default``: with the chunk prefix itself (the context the chunks were computed in);
- ``system:NAME``: with the template and another system prompt, chunks computed after the default prefix;
- ``own:NAME``: the same prompt, chunks computed after that prompt's own start (``chunk_prefix=`` its header);
- ``raw``: without the chat template (the instruction, then the chunks, then the question);
- ``own:raw``: the same, chunks computed after the instruction (``chunk_prefix=`` the instruction);
- ``raw, chunk first``: without the template and without the instruction: a chunk is the prompt's first token
  (the engine now computes such a chunk instead of reusing it: engine/placement.py).

    python benchmarks/chunk_context.py --model qwen2.5-coder-0.5b --n 8 --documents 4 --out results/ctx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.engine import teacher_force
from cacheblend_rag.eval.datasets import PREFIX, town_examples
from cacheblend_rag.eval.metrics import kl_divergence

SYSTEMS = {
    "short": "You are a helpful assistant.",
    "rag": "Answer the user's question using only the passages they give. If the passages do not say, say so.",
    "persona": (
        "You are Ada, the support assistant of the Port Merrow tourist office. You answer visitors' questions "
        "politely and briefly, in plain English, and you never make up facts that are not in the documents."
    ),
}
STRATEGIES = {
    "full_reuse": BlendConfig(strategy="full_reuse"),
    "cacheblend": BlendConfig(strategy="cacheblend", recompute_ratio=0.15, exact_when_faster=False),
}
FULL = BlendConfig(strategy="full_recompute")


def run(engine, segments, config: BlendConfig, targets: list[int] | None, max_new: int):
    """(greedy tokens, log-probs [T, V] along ``targets`` or along its own greedy tokens)."""
    req = engine.prepare(segments, config=config, extra_capacity=max_new + 1)
    eos = engine.eos_token_ids
    tokens, logits = [], req.logits
    for _ in range(max_new):
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos or len(tokens) == max_new:
            break
        logits = req.decode(token)
    return tokens, teacher_force(req, targets if targets is not None else tokens), req.stats


def variants(base, example, engines):
    """(label, engine whose chunks are reused, segments maker) per prompt start."""

    def chat(engine, system=None):
        return lambda: engine.chat_segments(
            [PREFIX, *engine.precompute(example.passages, context=0), example.query()], system
        )

    def raw(engine, instruction=True):
        head = [PREFIX] if instruction else []
        return lambda: [*head, *engine.precompute(example.passages, context=0), example.query()]

    out = [("default", base, chat(base))]
    for name, system in SYSTEMS.items():
        out += [
            (f"system:{name}", base, chat(base, system)),
            (f"own:{name}", engines[name], chat(engines[name], system)),
        ]
    out += [("raw", base, raw(base)), ("own:raw", engines["raw"], raw(engines["raw"]))]
    out.append(("raw, chunk first", base, raw(base, instruction=False)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n", type=int, default=6, help="town questions")
    parser.add_argument("--documents", type=int, default=4, help="documents per prompt")
    parser.add_argument("--max-new", type=int, default=8, help="answer tokens compared")
    parser.add_argument("--starts", default=None, help="comma-separated prompt starts to run (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    starts = set(args.starts.split(",")) if args.starts else None
    base = CacheBlendEngine.from_pretrained(args.model, store=["memory://?max_bytes=4GB"])
    engines = {}
    for name, system in SYSTEMS.items():
        header = base.chat_segments([], system)[0]
        store = ["memory://?max_bytes=4GB"]
        engines[name] = CacheBlendEngine(base.model, base.tokenizer, store=store, chunk_prefix=header)
    engines["raw"] = CacheBlendEngine(
        base.model, base.tokenizer, store=["memory://?max_bytes=4GB"], chunk_prefix=PREFIX
    )
    rows = []
    for i, example in enumerate(town_examples(args.documents)[: args.n]):
        for label, engine, make in variants(base, example, engines):
            if starts is not None and label not in starts:
                continue
            t = time.perf_counter()
            segments = make()
            ref, ref_logprobs, ref_stats = run(engine, segments, FULL, None, args.max_new)
            for strategy, config in STRATEGIES.items():
                tokens, logprobs, stats = run(engine, segments, config, ref, args.max_new)
                kl = kl_divergence(ref_logprobs, logprobs)
                rows.append(
                    {
                        "example": i,
                        "start": label,
                        "strategy": strategy,
                        "kl": kl.mean().item(),
                        "kl_first": kl[0].item(),
                        "same_answer": tokens == ref,
                        "prompt_tokens": ref_stats.prompt_tokens,
                        "reused_tokens": stats.reused_tokens,
                    }
                )
            print(f"example {i} {label}: {time.perf_counter() - t:.1f}s", flush=True)
    summary = {}
    for row in rows:
        summary.setdefault((row["start"], row["strategy"]), []).append(row)
    print(f"{args.model} ({base.dtype}), {args.n} town questions x {args.documents} documents, KL over {args.max_new}")
    print(f"{'prompt start':<22} {'strategy':<11} {'mean KL':>8} {'median KL':>9} {'first-token KL':>14} {'same':>6}")
    table = []
    for (start, strategy), items in summary.items():
        kls = [r["kl"] for r in items]
        entry = {
            "start": start,
            "strategy": strategy,
            "mean_kl": statistics.mean(kls),
            "median_kl": statistics.median(kls),
            "first_token_kl": statistics.mean(r["kl_first"] for r in items),
            "same_answer": sum(r["same_answer"] for r in items),
            "n": len(items),
        }
        table.append(entry)
        print(
            f"{start:<22} {strategy:<11} {entry['mean_kl']:>8.4f} {entry['median_kl']:>9.4f} "
            f"{entry['first_token_kl']:>14.4f} {entry['same_answer']:>3}/{entry['n']}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"args": vars(args), "dtype": str(base.dtype), "summary": table, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
