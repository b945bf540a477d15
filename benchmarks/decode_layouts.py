"""How to lay out the KV of a decode batch: the measurements behind engine/kv_slots.py.

For batch sizes B and two ranges of prompt lengths, on one model, each decoding step timed three ways over the
same prefilled prompts (interleaved, median of ``--steps``):

- ``B x one``: B one-sequence steps (``engine/decode.py`` ``decode_step``), what the engine does without batching;
- ``per-seq``: one forward for the batch (projections and MLP on [B, hidden]) with each sequence in its own
  ``KVCache`` and one attention call per sequence and layer;
- ``slots``: ``batch_step`` over a ``KVSlots`` pool, one masked attention call per layer for the batch.

Then the attention alone, per layer, on the model's head shapes: the slot pool's one call against a paged layout
(pages of 16 rows, a page table per sequence) that must gather each sequence's pages before SDPA in torch.

    python benchmarks/decode_layouts.py --model smollm2-135m --out results/decode_layouts.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: libgomp reads it once (README)

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cacheblend_rag
from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.engine import KVSlots, batch_step, decode_step

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(cacheblend_rag.__file__).parent / "data" / "corpus"
PAGE = 16


def per_sequence_step(fwd, caches: list, tokens: list[int]) -> torch.Tensor:
    """One forward for the batch, each sequence's attention over its own KVCache. -> logits [B, vocab]."""
    pos = torch.tensor([c.length for c in caches])
    fwd = fwd.within(min(c.capacity for c in caches))  # every position lies below it: nothing read back
    h = fwd.embed(torch.tensor(tokens))
    for layer in range(fwd.n_layers):
        q, k, v = fwd.qkv(layer, h, pos)
        k = fwd.rotate(k, pos)
        outs = []
        for i, cache in enumerate(caches):
            p = pos[i : i + 1]
            keys, values = cache.k[layer], cache.v[layer]
            keys.index_copy_(1, p, k[:, i : i + 1])
            values.index_copy_(1, p, v[:, i : i + 1])
            n = cache.length + 1
            outs.append(fwd.kernels.decode_attention(q[:, i : i + 1], p, keys, values, fwd.scale, length=n))
        h = fwd.finish_layer(layer, h, torch.cat(outs, dim=1))
    for cache in caches:
        cache.length += 1
    return fwd.logits(h)


def whole_steps(engine: CacheBlendEngine, b: int, lengths: tuple[int, int], steps: int) -> dict:
    """Median ms per step of the three ways, on ``b`` prompts of ``lengths`` words."""
    words = " ".join(p.read_text() for p in sorted(CORPUS.glob("*.md"))).split()
    rng = random.Random(b * 1000 + lengths[0])
    texts = [" ".join(words[: rng.randint(*lengths)]) for _ in range(b)]
    room = steps + 2
    fwd = engine.model_forward
    alone = [engine.prepare(prompt=t, extra_capacity=room).cache for t in texts]
    own = [engine.prepare(prompt=t, extra_capacity=room).cache for t in texts]
    slots = KVSlots.for_model(fwd, b, max(c.length for c in own) + room)
    for cache in own:
        slots.add(cache)

    def one():
        for cache in alone:
            decode_step(fwd, cache, 5)

    def pooled():
        pos = slots.lengths[:b]
        batch_step(fwd, slots, torch.tensor([5] * b), torch.tensor(pos), length=max(pos) + 1)
        for i in range(b):
            slots.lengths[i] += 1

    ways = {"B x one": one, "per-seq": lambda: per_sequence_step(fwd, own, [5] * b), "slots": pooled}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for _ in range(steps + 1):  # the first round warms up
            for name, run in ways.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    prompt = [c.length for c in own]
    row = {"batch": b, "prompt_tokens": f"{min(prompt)}-{max(prompt)}"}
    return row | {name: round(1000 * statistics.median(t[1:]), 1) for name, t in times.items()}


def attention_only(fwd, b: int, max_len: int, repeats: int = 30) -> dict:
    """Median microseconds per layer: the slot pool's masked SDPA against gathering pages first."""
    gen = torch.Generator().manual_seed(b)
    hkv, g, d, dtype = fwd.n_kv_heads, fwd.n_heads // fwd.n_kv_heads, fwd.head_dim, fwd.dtype
    lengths = torch.randint(max_len // 4, max_len, (b,), generator=gen)
    n = int(lengths.max())
    pages = -(-n // PAGE)
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    pool_k = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    pool_v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    page_k = torch.randn(b * pages * 2, hkv, PAGE, d, generator=gen).to(dtype)
    page_v = torch.randn(b * pages * 2, hkv, PAGE, d, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(b * pages * 2, generator=gen)[:pages] for _ in range(b)])  # [B, pages]
    visible = (torch.arange(pages * PAGE)[None] < lengths[:, None])[:, None, None]  # [B, 1, 1, pages * PAGE]

    def slots():
        return F.scaled_dot_product_attention(q, pool_k, pool_v, attn_mask=visible[..., :n])

    def paged():
        k = page_k[table].permute(0, 2, 1, 3, 4).reshape(b, hkv, pages * PAGE, d)
        v = page_v[table].permute(0, 2, 1, 3, 4).reshape(b, hkv, pages * PAGE, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)

    times: dict[str, list[float]] = {"slots": [], "paged": []}
    for _ in range(repeats):
        for name, run in (("slots", slots), ("paged", paged)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    row = {"batch": b, "keys": f"{int(lengths.min())}-{n}"}
    return row | {f"{name}_us": round(1e6 * statistics.median(t), 1) for name, t in times.items()}


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per cell (the median is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "decode_layouts.json")
    args = parser.parse_args()
    engine = CacheBlendEngine.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    steps = [whole_steps(engine, b, span, args.steps) for span in ((40, 120), (300, 700)) for b in args.batches]
    attention = [attention_only(engine.model_forward, b, 800) for b in args.batches]
    print(f"{args.model} ({engine.dtype}), ms per decoding step, median of {args.steps}:")
    print(markdown(steps))
    print("\nattention alone, us per layer:")
    print(markdown(attention))
    info = {"model": args.model, "dtype": str(engine.dtype), "threads": torch.get_num_threads()}
    info["load"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "steps": steps, "attention": attention}, indent=2))
    print(f"load average {info['load'][0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
