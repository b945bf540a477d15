"""How concentrated and how persistent is the KV deviation of reused chunks? (CacheBlend's two premises.)

For each example: the exact KV of the whole prompt (full prefill) versus the KV each chunk got when computed
alone (what full_reuse uses). Per layer, over the cached tokens:
  rel_dev        sqrt(sum |V_full - V_alone|^2 / sum |V_full|^2): how wrong reused values are;
  top_share      share of the squared deviation held by the top r of tokens (premise 1: a few tokens hold most);
  overlap_l1     overlap of the layer's top-r tokens with layer 1's top-r (premise 2: the check layer's choice
                 stays right in deeper layers).

Usage: python benchmarks/deviation_analysis.py --data ../shared/data/musique_dev.json --n 5 --out results/deviation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.engine import reused_prompt, run_plan
from cacheblend_rag.eval.datasets import load_examples


def analyse(engine, example, ratio: float) -> list[dict]:
    prompt = reused_prompt(engine, example.prompt(engine))
    exact = run_plan(engine, prompt.full_plan(capture=True))
    full_v = exact.captured.v.float()  # [L, H, N, D]
    alone_v = full_v.clone()
    cached = prompt.cached
    for span in prompt.spans:
        alone_v[:, :, span.start : span.end] = span.kv.v.float()
    dev = (full_v - alone_v).square().sum(dim=(1, 3))[:, cached]  # [L, cached tokens]
    norm = full_v.square().sum(dim=(1, 3))[:, cached]
    k = max(1, round(ratio * int(cached.sum())))
    first = set(torch.topk(dev[1], k).indices.tolist())
    rows = []
    for layer in range(1, dev.shape[0]):
        d = dev[layer]
        top = torch.topk(d, k)
        rows.append(
            {
                "layer": layer,
                "rel_dev": (d.sum() / norm[layer].sum()).sqrt().item(),
                "top_share": (top.values.sum() / d.sum()).item(),
                "overlap_l1": len(first & set(top.indices.tolist())) / k,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/musique_dev.json"))
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="results/deviation.json")
    args = parser.parse_args()
    engine = CacheBlendEngine.from_pretrained(args.model, dtype=args.dtype, store=["memory://?max_bytes=8GB"])
    per_example = [analyse(engine, ex, args.ratio) for ex in load_examples(args.data, args.n)]
    layers = len(per_example[0])
    summary = [
        {key: statistics.fmean(ex[i][key] for ex in per_example) for key in per_example[0][i]} for i in range(layers)
    ]
    print(f"KV deviation of reused chunks, {args.n} examples, top {args.ratio:.0%} of cached tokens")
    print(f"{'layer':>5} {'rel. V deviation':>17} {'top share':>10} {'overlap w/ layer 1':>19}")
    for row in summary:
        print(f"{int(row['layer']):5d} {row['rel_dev']:17.3f} {row['top_share']:10.2f} {row['overlap_l1']:19.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "examples": per_example}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
