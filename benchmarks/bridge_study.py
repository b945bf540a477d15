"""What two-passage answers lose under blending, and two levers for it: selection that follows the bridge, and APE.

A bridge question ("How many beds does the hospital where the mayor once worked have?") needs the question to read
one passage (the mayor's, which names the hospital) and that passage to read another (the hospital's beds). The
query selection recomputes the cached rows the question reads (hop 1); the rows *those* read in other chunks
(hop 2) are recomputed only if the question also reads them. Methods, each recomputing 15% of the cached rows
(``--ratio``) unless said otherwise, on the same stored KV (``--way``, as ``context_precompute.py`` builds it):

- ``token``: the query selection as the engine ships it (the probe pass's tail attention, second half of the
  layers), rebuilt on ``cacheblend_rag.engine.research``;
- ``join:H``: hop 1 = the top H of the budget by that score; a hop pass recomputes them (and the uncached rows)
  and measures, in the second half of the layers, the share of each hop-1 row's attention to cached rows of
  *other* chunks that each row gets (averaged over hop-1 rows); hop 2 = the rest of the budget by that score;
  then hop 1 and hop 2 are recomputed together through every layer (one pass more than ``token``);
- ``seq:H``: as ``join:H``, but the answer's pass keeps hop 1's K/V from the hop pass and computes only hop 2 and
  the uncached rows on it: the same rows computed as ``token`` plus the uncached ones twice (cost-neutral);
- ``add:E``: ``token``'s rows plus E of the budget more, by the hop-2 score (a share of 0.15 * (1 + E));
- ``ape:full_reuse``, ``ape:token``: APE (Yang et al., ICLR 2025) on top: for the rows after the last chunk (the
  question, the template and the answer), the attention logits to the chunks' rows are divided by T and the
  chunks' total weight is scaled by S (T = S = 0.9: APE's published default). Research only: the engine's
  kernels are patched in this process.

Gold F1 kept over full recompute's on the town questions it answers (F1 >= 0.5), one- and two-passage apart,
and answers worse than ``full_reuse``; every answer is in the JSON. ``--reference`` takes full recompute's answers
from a ``blend_guard.py`` run of the same model, and full_reuse's where it ran the same ``--way``, instead of
computing them again.

    python benchmarks/bridge_study.py --model qwen2.5-coder-1.5b --way alone \\
        --methods token,join:0.5,seq:0.5,add:0.33,ape:full_reuse,ape:token --out results/bridge_study_alone.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from blend_guard import kept, load_reference
from context_precompute import ANSWERED, contexts, precompute

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.engine import PlanRun, attention_mass, reused_prompt, run_plan
from cacheblend_rag.eval.datasets import load_examples
from cacheblend_rag.eval.metrics import best_over, f1_score
from cacheblend_rag.kernels.dispatch import Kernels

MAX_NEW_TOKENS = 24
APE_T, APE_S = 0.9, 0.9


class Reads:
    """Observer: per prompt row, the share of the ``readers``' attention to cached rows each row gets, summed over
    the layers from ``first_layer`` on. ``joint``: one share over all readers (as the engine's probe scores);
    else one share per reader, over the cached rows outside its own chunk, averaged over readers.

    readers: [R] prompt rows (host); cached: [N] float (1: cached); chunk_of: [N] chunk index of each row (-1)."""

    def __init__(self, readers, cached, chunk_of, scale: float, first_layer: int, joint: bool) -> None:
        self.readers, self.cached, self.chunk_of = readers, cached, chunk_of
        self.scale, self.first_layer, self.joint = scale, first_layer, joint
        self.scores = torch.zeros(cached.shape[0])

    def __call__(self, layer: int, q: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """q: [Hq, M, D] rotated queries of ``rows``: [M]; keys: [Hkv, N, D] rotated."""
        if layer < self.first_layer:
            return
        host = rows.cpu()
        if rows.shape[0] == 1 and not self.joint:  # the last layer computes only the last row: no reader there
            return
        pick = torch.isin(host, self.readers) if rows.shape[0] > 1 else torch.ones(1, dtype=torch.bool)
        idx = pick.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        if self.joint:
            at = idx.to(q.device)
            mass = attention_mass(q[:, at], rows[at], keys, self.scale).float().cpu() * self.cached
            self.scores += mass / mass.sum().clamp_min(1e-30)
            return
        total = torch.zeros_like(self.scores)
        for r in idx.tolist():
            mass = attention_mass(q[:, r : r + 1], rows[r : r + 1], keys, self.scale).float().cpu() * self.cached
            own = int(self.chunk_of[int(host[r])])
            if own >= 0:
                mass = mass * (self.chunk_of != own)
            total += mass / mass.sum().clamp_min(1e-30)
        self.scores += total / idx.numel()


class Ape:
    """APE's query attention, patched into ``Kernels`` while ``on``: rows at or after ``end`` (the first row after
    the last chunk) read the chunks' rows [start, end) with logits / T, the chunks' total weight scaled by S."""

    def __init__(self) -> None:
        self.on, self.start, self.end = False, 0, 0
        self.plain_attention, self.plain_decode = Kernels.attention, Kernels.decode_attention
        ape = self

        def attention(kernels, q, q_pos, k, v, scale):
            if not ape.on:
                return ape.plain_attention(kernels, q, q_pos, k, v, scale)
            return ape.attend(q, q_pos, k, v, scale)

        def decode_attention(kernels, q, pos, k, v, scale, *, length=None):
            if not ape.on:
                return ape.plain_decode(kernels, q, pos, k, v, scale, length=length)
            return ape.attend(q, pos.reshape(1), k, v, scale)

        Kernels.attention, Kernels.decode_attention = attention, decode_attention

    def attend(self, q, q_pos, k, v, scale):
        """q: [Hq, M, D] rotated at q_pos: [M]; k, v: [Hkv, N, D], key j at position j -> [Hq, M, D]."""
        hq, m, d = q.shape
        pos = q_pos.to(torch.long).cpu()
        n = int(pos.max()) + 1  # keys past the last query are never read (a decode cache holds garbage there)
        k, v = k[:, :n], v[:, :n]
        hkv = k.shape[0]
        g = hq // hkv
        x = (q.float().reshape(hkv, g * m, d) @ k.float().transpose(1, 2)).view(hkv, g, m, n) * scale
        keys = torch.arange(n)
        x = x.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
        doc = (keys >= self.start) & (keys < self.end)  # [N]
        reads = pos >= self.end  # [M]: the rows APE adjusts
        if reads.any() and doc.any():
            xd = x[..., doc] / APE_T
            adjusted = xd + (APE_T - 1) * torch.logsumexp(xd, dim=-1, keepdim=True) + math.log(APE_S)
            x[..., doc] = torch.where(reads[None, None, :, None], adjusted, x[..., doc])
        w = torch.softmax(x, dim=-1)
        return (w.reshape(hkv, g * m, n) @ v.float()).view(hq, m, d).to(q.dtype)


def greedy(engine, plan=None, run: PlanRun | None = None) -> str:
    """The greedy answer to the first newline of ``plan`` (or of a prefill already ``run``)."""
    run = run or run_plan(engine, plan, extra_capacity=MAX_NEW_TOKENS + 1)
    tokens, logits = [], run.logits
    for _ in range(MAX_NEW_TOKENS):
        token = int(logits.argmax())
        tokens.append(token)
        if token in engine.eos_token_ids or "\n" in engine.tokenizer.decode(tokens, skip_special_tokens=True):
            break
        logits = run.decode(token)
    text = engine.tokenizer.decode([t for t in tokens if t not in engine.eos_token_ids], skip_special_tokens=True)
    return text.split("\n")[0].strip()


def engine_answer(engine, segments, config: BlendConfig) -> str:
    result = engine.generate(segments, config=config, max_new_tokens=MAX_NEW_TOKENS, stop=["\n"])
    return result.text.strip().split("\n")[0].strip()


def hops(engine, prompt, score1, chunk_of, k: int, mode: str, h: float, first_layer: int) -> str:
    """The answer of a bridge method (``join``, ``seq`` or ``add``, share ``h``) on ``prompt``."""
    cached = prompt.cached
    k1 = k if mode == "add" else round(h * k)
    k2 = round(h * k) if mode == "add" else k - k1
    hop1 = score1.topk(k1).indices.sort().values
    second = Reads(hop1, cached.float(), chunk_of, engine.model_forward.scale, first_layer, joint=False)
    run = run_plan(engine, prompt.plan(hop1, observe=second), extra_capacity=MAX_NEW_TOKENS + 1)
    score2 = second.scores.masked_fill(~cached, -1)
    score2[hop1] = -1
    hop2 = score2.topk(k2).indices.sort().values
    if mode in ("join", "add"):
        return greedy(engine, prompt.plan(torch.cat([hop1, hop2]).sort().values))
    # seq: hop 1's K/V stays as the hop pass left it; hop 2 and the uncached rows are computed on it
    return greedy(engine, run=run_plan(engine, replace(prompt.plan(hop2), cache_ready=True), on=run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--n", type=int, default=None, help="first n town questions (default: all)")
    parser.add_argument("--way", default="alone", help="how chunks are precomputed (context_precompute.py)")
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--methods", default="token,join:0.5,seq:0.5")
    parser.add_argument("--reference", type=Path, default=None, help="a blend_guard.py JSON of the same model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    ape = Ape()
    engine = CacheBlendEngine.from_pretrained(args.model, store=["memory://?max_bytes=8GB"])
    examples = load_examples("town", args.n)
    spec = json.loads((Path(__file__).resolve().parents[1] / "cacheblend_rag/data/town_questions.json").read_text())
    kinds = ["two" if len(q["documents"]) > 1 else "one" for q in spec["questions"]]
    reference, taken = load_reference(args.reference, args)
    corpus = sorted({p for e in examples for p in e.passages})
    _, handles = precompute(engine, corpus, contexts(args.way, corpus, "", [e.passages for e in examples], engine))
    first_layer = engine.model_forward.n_layers // 2  # FIRST_SCORED_LAYER of the query selection
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for i, e in enumerate(examples):
        segments = engine.chat_segments(e.user_segments([handles[p] for p in e.passages]))
        prompt = reused_prompt(engine, segments)
        row = {"question": e.question, "gold": e.answers, "kind": kinds[i]}
        if reference is not None and (i >= len(reference) or reference[i]["question"] != e.question):
            raise SystemExit(f"--reference row {i} is another question; give a run of the same questions")
        answers = {
            label: reference[i][label]["answer"]
            if label in taken
            else engine_answer(engine, segments, BlendConfig(strategy=label))
            for label in ("full_recompute", "full_reuse")
        }
        n, cached = prompt.n, prompt.cached
        chunk_of = torch.full((n,), -1, dtype=torch.long)
        for c, span in enumerate(prompt.spans):
            chunk_of[span.start : span.end] = c
        first = min(span.start for span in prompt.spans)
        tail = ((~cached) & (torch.arange(n) >= first)).nonzero().squeeze(1)
        probe = Reads(tail, cached.float(), chunk_of, engine.model_forward.scale, first_layer, joint=True)
        run_plan(engine, prompt.plan(observe=probe))
        score1 = probe.scores.masked_fill(~cached, -1)
        k = round(args.ratio * int(cached.sum()))
        ape.start, ape.end = first, prompt.tail_start
        for method in methods:
            kind, _, arg = method.partition(":")
            if kind == "token":
                answers[method] = greedy(engine, prompt.plan(score1.topk(k).indices.sort().values))
            elif kind in ("join", "seq", "add"):
                answers[method] = hops(engine, prompt, score1, chunk_of, k, kind, float(arg), first_layer)
            elif kind == "ape":
                ape.on = True
                try:
                    if arg == "full_reuse":
                        answers[method] = greedy(engine, prompt.plan())
                    else:
                        answers[method] = greedy(engine, prompt.plan(score1.topk(k).indices.sort().values))
                finally:
                    ape.on = False
            else:
                raise SystemExit(f"unknown method {method!r}: token, join:H, seq:H, add:E, ape:full_reuse, ape:token")
        for label, text in answers.items():
            row[label] = {"answer": text, "f1": best_over(f1_score, text, e.answers)}
        row["answered"] = row["full_recompute"]["f1"] >= ANSWERED
        rows.append(row)
        print(f"{i + 1}/{len(examples)} " + " | ".join(f"{m}: {row[m]['answer']}" for m in answers), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))
    summary = []
    for label in ["full_reuse", *methods]:
        answered = [r for r in rows if r["answered"]]
        summary.append(
            {
                "method": label,
                "one": kept(rows, lambda r, label=label: r[label], "one"),
                "two": kept(rows, lambda r, label=label: r[label], "two"),
                "all": kept(rows, lambda r, label=label: r[label], None),
                "worse_than_reuse": sum(r[label]["f1"] < r["full_reuse"]["f1"] - 1e-9 for r in answered),
            }
        )
    print(f"\n{len(rows)} questions ({time.strftime('%H:%M:%S')}); gold F1 kept vs full recompute where it answers")
    for s in summary:
        cells = [f"{100 * s[c]['kept']:.0f}% ({s[c]['n']})" if s[c]["kept"] else "-" for c in ("one", "two")]
        print(f"{s['method']:<16} one {cells[0]:>10} two {cells[1]:>10} worse {s['worse_than_reuse']}")
    if args.out:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
