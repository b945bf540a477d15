"""Why does cacheblend's token selection help or not on a model? A diagnostic of reused chunk KV.

For each example: the full-recompute KV of every layer (the truth), the stored chunk KV (what is reused),
their per-token deviation by layer, and the first-token KL(full || method) of fixed recompute sets chosen
by oracles (the true deviation at some layer) and by the engine's own selections. Prints tables, writes JSON.

    python benchmarks/selection_study.py --model qwen2.5-coder-0.5b --data ../shared/data/musique_dev.json --n 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.engine import attention_mass, reused_prompt, run_plan
from cacheblend_rag.eval.datasets import load_examples
from cacheblend_rag.store import ChunkKV


def first_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum())


class MassProbe:
    """Attention mass each key receives from the prompt's tail rows (after the last chunk), per layer: [L, N]."""

    def __init__(self, engine, tail_start: int, n: int) -> None:
        self.tail_start, self.scale = tail_start, engine.model_forward.scale
        self.mass = torch.zeros(engine.model_forward.n_layers, n)

    def __call__(self, layer, q, rows, keys) -> None:
        mask = rows >= self.tail_start
        if mask.any():
            m = attention_mass(q[:, mask], rows[mask], keys, self.scale)
            self.mass[layer] = m.float().cpu() / (q.shape[0] * int(mask.sum()))


def study_example(engine, example, args, rng) -> dict:
    segments = example.prompt(engine, args.k)
    prompt = reused_prompt(engine, segments)
    spans, offset = prompt.spans, prompt.offsets
    n = prompt.n
    tail_start = prompt.tail_start
    full_probe = MassProbe(engine, tail_start, n)
    t = time.perf_counter()
    full = run_plan(engine, prompt.full_plan(capture=True, observe=full_probe))
    full_s = time.perf_counter() - t
    fk, fv = full.captured.k.float(), full.captured.v.float()  # [L, H, N, D] pre-RoPE
    n_layers = fk.shape[0]
    dv = torch.zeros(n_layers, n)
    dk = torch.zeros(n_layers, n)
    vnorm = torch.zeros(n_layers, n)
    for span in spans:
        a, b = span.start, span.end
        sk, sv = span.kv.k.float(), span.kv.v.float()
        dv[:, a:b] = ((fv[:, :, a:b] - sv) ** 2).sum(dim=(1, 3))
        dk[:, a:b] = ((fk[:, :, a:b] - sk) ** 2).sum(dim=(1, 3))
        vnorm[:, a:b] = (fv[:, :, a:b] ** 2).sum(dim=(1, 3))
    rows = prompt.rows
    n_cached = rows.numel()
    budget = round(args.ratio * n_cached)

    def top(score: torch.Tensor, k: int = budget) -> torch.Tensor:
        return rows[score[rows].topk(k).indices]

    out: dict = {"prompt_tokens": n, "cached_tokens": n_cached, "full_prefill_s": full_s, "layers": {}}
    # sparsity and persistence of the true deviation
    top1 = set(top(dv[1]).tolist())
    for layer in range(n_layers):
        d = dv[layer, rows]
        share = float(d.topk(budget).values.sum() / d.sum().clamp_min(1e-30))
        rel = float((d.sum() / vnorm[layer, rows].sum()).sqrt())
        overlap = len(top1 & set(top(dv[layer]).tolist())) / budget
        heads = {}
        for name, (lo, hi) in {"0": (0, 1), "1-3": (1, 4), "4-15": (4, 16), "16+": (16, 1 << 30)}.items():
            mask = (offset[rows] >= lo) & (offset[rows] < hi)
            heads[name] = float(d[mask].mean() / d.mean()) if mask.any() else float("nan")
        out["layers"][layer] = {"top_share": share, "rel_dev": rel, "overlap_l1": overlap, "by_offset": heads}

    # KL of fixed recompute sets (recomputed at every layer; everything else reused at every layer)
    def fixed(extra: torch.Tensor) -> float:
        return first_token_kl(full.logits, run_plan(engine, prompt.plan(extra)).logits)

    reuse_probe = MassProbe(engine, tail_start, n)
    kls = {"full_reuse": first_token_kl(full.logits, run_plan(engine, prompt.plan(observe=reuse_probe)).logits)}
    mf, mr = full_probe.mass, reuse_probe.mass
    out["sink_mass_full"] = float(mf[:, 0].mean())
    out["sink_mass_reuse"] = float(mr[:, 0].mean())
    out["chunk_mass_full"] = float(mf[:, rows].sum(1).mean())
    out["chunk_mass_reuse"] = float(mr[:, rows].sum(1).mean())
    kls["oracle_attn_full_sum"] = fixed(top(mf.sum(0)))
    kls["oracle_attn_x_dev"] = fixed(top((mf * dv).sum(0)))
    kls["attn_L1"] = fixed(top(mf[1]))
    kls["prophet_reuse_attn_sum"] = fixed(top(mr.sum(0)))
    kls["prophet_reuse_attn_max"] = fixed(top(mr.max(0).values))
    for layer in args.oracle_layers:
        if layer < n_layers:
            kls[f"oracle_v@L{layer}"] = fixed(top(dv[layer]))
    rel_all = (dv / vnorm.clamp_min(1e-12)).mean(0)
    kls["oracle_v_rel_all_layers"] = fixed(top(rel_all))
    kls["oracle_v_abs_all_layers"] = fixed(top(dv.mean(0)))
    kls["random"] = fixed(rows[torch.randperm(n_cached, generator=rng)[:budget]])
    kls["chunk_heads"] = fixed(rows[offset[rows] < max(1, budget // max(1, len(spans)))])
    # how much of the deviation is one shift shared by a chunk's tokens (per layer, head, dim), and what
    # reusing with that shift added would give
    common = {"k": [], "v": []}
    shifted = {"kv": [], "k": [], "v": []}  # per variant, one ChunkKV per span
    for span in spans:
        a, b = span.start, span.end
        sk, sv = span.kv.k.float(), span.kv.v.float()
        delta_k, delta_v = fk[:, :, a:b] - sk, fv[:, :, a:b] - sv  # [L, H, T, D]
        mk, mv = delta_k.mean(2, keepdim=True), delta_v.mean(2, keepdim=True)
        common["k"].append(float((mk**2).sum() * (b - a) / (delta_k**2).sum()))
        common["v"].append(float((mv**2).sum() * (b - a) / (delta_v**2).sum()))
        dt = span.kv.k.dtype
        for name, (nk, nv) in {"kv": (sk + mk, sv + mv), "k": (sk + mk, sv), "v": (sk, sv + mv)}.items():
            shifted[name].append(ChunkKV(nk.to(dt), nv.to(dt)))
    out["common_share"] = {k: statistics.fmean(v) for k, v in common.items()}
    for name, kvs in shifted.items():
        logits = run_plan(engine, prompt.plan(kvs=kvs)).logits
        kls[f"full_reuse+true_mean_shift_{name}"] = first_token_kl(full.logits, logits)
    for name, config in args.configs.items():
        t = time.perf_counter()
        req = engine.prepare(segments, config=config)
        kls[name] = first_token_kl(full.logits, req.logits)
        out.setdefault("ttft_s", {})[name] = time.perf_counter() - t
    out["kl"] = kls
    return out


CONFIGS = {
    "cacheblend@r": {},
    "cacheblend[attention]@r": {"selection": "attention"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--k", type=int, default=None, help="passages per prompt (default all)")
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--chunk-prefix", default=None, help="text chunks are computed after (default: engine's)")
    parser.add_argument("--oracle-layers", default="1,2,4,8,12,16,20")
    parser.add_argument("--out", default="results/selection_study.json")
    args = parser.parse_args()
    args.oracle_layers = [int(x) for x in args.oracle_layers.split(",")]
    args.configs = {
        k.replace("@r", f"@{args.ratio:g}"): BlendConfig(recompute_ratio=args.ratio, exact_when_faster=False, **v)
        for k, v in CONFIGS.items()
    }
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    engine = CacheBlendEngine.from_pretrained(
        args.model, store=["memory://?max_bytes=16GB"], chunk_prefix=args.chunk_prefix
    )
    examples = load_examples(args.data, args.n)
    results = []
    for i, example in enumerate(examples):
        r = study_example(engine, example, args, rng)
        results.append(r)
        print(
            f"example {i}: {r['prompt_tokens']} tokens; " + ", ".join(f"{k} {v:.3f}" for k, v in r["kl"].items()),
            flush=True,
        )
    n_layers = len(results[0]["layers"])
    print("\nlayer | top-15% share | rel dev | overlap w/ L1 top | dev by chunk offset 0 / 1-3 / 4-15 / 16+ (x mean)")
    for layer in range(n_layers):
        rs = [r["layers"][layer] for r in results]

        def m(key, rs=rs):
            return statistics.fmean(x[key] for x in rs)

        offs = " / ".join(f"{statistics.fmean(x['by_offset'][o] for x in rs):.2f}" for o in ("0", "1-3", "4-15", "16+"))
        print(f"{layer:5d} | {m('top_share'):.2f} | {m('rel_dev'):.3f} | {m('overlap_l1'):.2f} | {offs}")
    for key in ("sink_mass_full", "sink_mass_reuse", "chunk_mass_full", "chunk_mass_reuse"):
        print(f"{key}: {statistics.fmean(r[key] for r in results):.3f}")
    for key in ("k", "v"):
        share = statistics.fmean(r["common_share"][key] for r in results)
        print(f"share of {key} deviation that is one shift per chunk: {share:.2f}")
    print(f"\nfirst-token KL(full || method), mean over {len(results)} examples (median):")
    for key in results[0]["kl"]:
        vals = [r["kl"][key] for r in results]
        print(f"  {key:28s} {statistics.fmean(vals):.3f} ({statistics.median(vals):.3f})")
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "examples": results}))


if __name__ == "__main__":
    main()
