"""What a prefill costs beyond its FLOPs: the constants of the engine's cost model (cacheblend_rag/engine/cost.py).

Runs prompts of 1 to 8 chunks of 16 to 256 tokens under full_recompute, full_reuse and cacheblend (query selection)
and fits the measured prefill time as

    seconds = a x (row FLOPs + attention FLOPs) + b x passes x layers + c x cached rows x layers

then prints ``b`` and ``c`` in rows computed (``PASS_ROWS``, ``CACHED_ROW``), how well the fit and the shipped
constants predict which strategy is faster, and the prompt length where blending starts to win.

    python benchmarks/strategy_cost.py --model smollm2-135m --out results/strategy_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.engine import CostModel, ModelShape

WORDS = [
    *("harbour", "ledger", "tide", "lantern", "granite", "orchard", "ferry", "council", "bell", "market", "copper"),
    *("river", "meadow", "quarry", "signal", "archive", "beacon", "timber", "cellar", "mill", "bridge", "canal"),
    *("pier", "festival", "weather", "almanac", "chapel", "foundry", "mural"),
]
CONFIGS = {
    "full_recompute": BlendConfig(strategy="full_recompute"),
    "full_reuse": BlendConfig(strategy="full_reuse"),
    "cacheblend": BlendConfig(strategy="cacheblend", recompute_ratio=0.15, exact_when_faster=False),
}


def chunk_text(engine, index: int, tokens: int) -> str:
    """A chunk of about ``tokens`` tokens (deterministic filler sentences)."""
    words, i = [], index
    while len(engine.tokenize(" ".join(words))) < tokens:
        words.append(WORDS[i % len(WORDS)] + ("." if i % 9 == 8 else ""))
        i += 7
    return f"Note {index}: " + " ".join(words)


def measure(engine, n_chunks: int, chunk_tokens: int, repeats: int) -> list[dict]:
    texts = [chunk_text(engine, 100 * chunk_tokens + i, chunk_tokens) for i in range(n_chunks)]
    handles = engine.precompute(texts, context=0)
    parts = ["Read the notes.\n"]
    for handle in handles:
        parts += [handle, "\n"]
    segments = engine.chat_segments([*parts, "Which note mentions the harbour?"])
    spans = [(b.start, b.end) for b in engine.blocks(segments) if b.handle is not None]
    rows = []
    for name, config in CONFIGS.items():
        engine.generate(segments, config=config, max_new_tokens=1)  # warm
        times = []
        for _ in range(repeats):
            stats = engine.generate(segments, config=config, max_new_tokens=1).stats
            times.append(stats.prefill_s)
        rows.append(
            {
                "strategy": name,
                "chunks": n_chunks,
                "chunk_tokens": chunk_tokens,
                "spans": spans,
                "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_tokens,
                "recomputed_tokens": stats.recomputed_tokens,
                "flops": stats.prefill_flops,
                "prefill_s": statistics.median(times),
            }
        )
    return rows


def features(row: dict, layers: int) -> list[float]:
    """(FLOPs, passes x layers, cached rows x layers) of a measured prefill."""
    passes = {"full_recompute": 1, "full_reuse": 1, "cacheblend": 2}[row["strategy"]]
    cached = row["cached_tokens"] * passes
    return [row["flops"], passes * layers, cached * layers]


def fit(rows: list[dict], layers: int) -> list[float]:
    x = torch.tensor([features(r, layers) for r in rows], dtype=torch.float64)
    y = torch.tensor([r["prefill_s"] for r in rows], dtype=torch.float64)
    scale = x.abs().max(dim=0).values.clamp_min(1e-30)
    coef = torch.linalg.lstsq(x / scale, y.unsqueeze(1)).solution.squeeze(1) / scale
    return coef.tolist()


def agreement(shape: ModelShape, rows: list[dict], model: CostModel) -> tuple[int, int]:
    """How often ``model`` picks the faster of full_recompute and cacheblend: (right, cases)."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["chunks"], r["chunk_tokens"]), {})[r["strategy"]] = r
    right = 0
    for group in by.values():
        full, blend = group["full_recompute"], group["cacheblend"]
        spans = [tuple(span) for span in full["spans"]]
        est = model.estimate(shape, full["prompt_tokens"], spans, 0.15, probe=True)
        right += est.blend_wins == (blend["prefill_s"] < full["prefill_s"])
    return right, len(by)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chunks", default="1,2,4,8")
    parser.add_argument("--chunk-tokens", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    engine = CacheBlendEngine.from_pretrained(args.model, dtype=args.dtype, store=["memory://?max_bytes=4GB"])
    shape = ModelShape.of(engine.model_forward)
    rows = []
    for n_chunks in (int(x) for x in args.chunks.split(",")):
        for tokens in (int(x) for x in args.chunk_tokens.split(",")):
            rows += measure(engine, n_chunks, tokens, args.repeats)
    a, b, c = fit(rows, shape.n_layers)
    pass_rows = b / (a * shape.row_flops) if a > 0 else float("nan")
    cached_row = c / (a * shape.row_flops) if a > 0 else float("nan")
    print(f"{'chunks':>6} {'tokens':>6} {'prompt':>6} {'full ms':>8} {'reuse ms':>8} {'blend ms':>8}")
    by = {}
    for r in rows:
        by.setdefault((r["chunks"], r["chunk_tokens"]), {})[r["strategy"]] = r
    for (chunks, tokens), group in by.items():
        ms = [1000 * group[s]["prefill_s"] for s in CONFIGS]
        print(
            f"{chunks:>6} {tokens:>6} {group['full_recompute']['prompt_tokens']:>6} "
            + " ".join(f"{m:>8.1f}" for m in ms)
        )
    print(
        f"\nfit: {a:.3e} s/FLOP; a pass over a layer = {pass_rows:.1f} rows; "
        f"a cached row at a layer = {cached_row:.3f} rows"
    )
    fitted = agreement(shape, rows, CostModel(pass_rows=pass_rows, cached_row=cached_row))
    shipped = agreement(shape, rows, CostModel())
    print(f"faster strategy predicted: fitted constants {fitted[0]}/{fitted[1]}, shipped {shipped[0]}/{shipped[1]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fitted_out = {"pass_rows": pass_rows, "cached_row": cached_row, "agreement": fitted, "shipped": shipped}
        args.out.write_text(json.dumps({"model": args.model, "fit": fitted_out, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
