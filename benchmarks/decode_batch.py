"""Decode-phase throughput of batched decoding against one stream and against Hugging Face's batched ``generate``.

For each model and batch size B (1, 4, 8, 16 by default), B chat prompts of different lengths (a passage of the
bundled corpus, 60 to ~330 words, and a question) are prefilled one by one through the engine, then decoded
together by a ``RunningBatch`` (engine/running_batch.py: one forward per step for all of them) for ``--new``
tokens each, EOS ignored. Reported:

- ``engine tok/s``: B x (new - 1) tokens over the time of the decoding steps (the first token comes from the
  prefill), and ``x1``: that over the same at B = 1 (the issue's target at B = 16: >= 5x);
- ``HF tok/s``: Hugging Face's ``generate`` on the same model and the same token ids, left-padded into one batch,
  greedy, ``min_new_tokens = max_new_tokens = new``: B x (new - 1) tokens over the time from the first new tokens
  to the last (a streamer notes when each step's tokens arrive), and its own ``x1``;
- ``today``: at B = 1, the engine's one-request decoder (``engine.generate``: ``stats.decode_s``), which batched
  decoding at B = 1 must not be slower than.

Each cell is the best of ``--repeats`` runs, the engine's and Hugging Face's interleaved, so a machine shared with
other work moves both alike; the JSON records the load average before and after. Compare ratios within one run.

    python benchmarks/decode_batch.py                                  # smollm2-135m and qwen2.5-coder-0.5b
    python benchmarks/decode_batch.py --models smollm2-135m --batches 1 16 --new 16 --out results/quick.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: libgomp reads it once (README)

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import cacheblend_rag
from cacheblend_rag import CacheBlendEngine, SamplingParams
from cacheblend_rag.engine import RunningBatch, Sampler, TextStreamer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(cacheblend_rag.__file__).parent / "data" / "corpus"
QUESTION = "\n\nIn two sentences, what does this passage say?"


def passages(count: int) -> list[str]:
    """``count`` passages of the bundled corpus, 60 to ~330 words, each a different length."""
    words = " ".join(p.read_text() for p in sorted(CORPUS.glob("*.md"))).split()
    out = []
    for i in range(count):
        n = 60 + (i * 97) % 271
        start = (i * 1009) % (len(words) - n)
        out.append(" ".join(words[start : start + n]))
    return out


def engine_decode(engine: CacheBlendEngine, prompts: list[str], new: int) -> tuple[float, list[list[int]]]:
    """Prefill ``prompts``, decode them in one RunningBatch for ``new`` tokens each. -> (decode seconds, prompt ids)."""
    requests = [engine.prepare(prompt=p) for p in prompts]
    capacity = max(r.cache.length for r in requests) + new
    batch = RunningBatch(engine.model_forward, slots=len(prompts), capacity=capacity, graphs=engine.cuda_graphs)
    sampling = SamplingParams(max_new_tokens=new)
    for r in requests:
        batch.add(r.cache, r.logits, Sampler(sampling), TextStreamer(engine.tokenizer, ()), new, frozenset())
    seqs = batch.sequences
    started = time.perf_counter()
    while len(batch):
        batch.step()
    elapsed = time.perf_counter() - started
    assert all(len(s.tokens) == new for s in seqs)
    return elapsed, [r.prompt_ids for r in requests]


def today_decode(engine: CacheBlendEngine, prompt: str, new: int) -> float:
    """Decode seconds of one request through the engine's one-request path (EOS ignored)."""
    eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset()
    try:
        result = engine.generate(prompt=prompt, max_new_tokens=new)
    finally:
        engine.eos_token_ids = eos
    assert len(result.token_ids) == new
    return result.stats.decode_s


class Clock:
    """A ``generate`` streamer that notes when each step's tokens arrive (the first call brings the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode(model, prompt_ids: list[list[int]], pad_id: int, new: int) -> float:
    """Seconds Hugging Face's batched ``generate`` takes from the first new token of every prompt (left-padded)
    to the last: tokens 2..new, the decoding steps only."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=model.device)
    clock = Clock()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            streamer=clock,
        )
    assert out.shape[1] == width + new and len(clock.times) == new + 1
    return clock.times[-1] - clock.times[1]


def measure(name: str, args) -> list[dict]:
    engine = CacheBlendEngine.from_pretrained(name, device=args.device, dtype=args.dtype)
    tokenizer = engine.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = passages(max(args.batches))
    prompts = [engine.format_chat([{"role": "user", "content": text + QUESTION}]) for text in texts]
    engine_decode(engine, prompts[:2], 4)  # warm-up: first calls allocate and pick kernels
    rows = []
    for b in args.batches:
        best = {"engine": 0.0, "hf": 0.0, "today": 0.0}
        for _ in range(args.repeats):
            seconds, ids = engine_decode(engine, prompts[:b], args.new)
            best["engine"] = max(best["engine"], b * (args.new - 1) / seconds)
            best["hf"] = max(best["hf"], b * (args.new - 1) / hf_decode(engine.model, ids, pad_id, args.new))
            if b == 1:
                best["today"] = max(best["today"], (args.new - 1) / today_decode(engine, prompts[0], args.new))
        lengths = [len(i) for i in ids]
        row = {"model": name, "dtype": str(engine.dtype).removeprefix("torch."), "batch": b}
        row |= {"prompt_tokens": f"{min(lengths)}-{max(lengths)}", "new_tokens": args.new}
        row |= {f"{k}_tok_s": round(v, 2) for k, v in best.items() if v}
        rows.append(row)
        print(f"  {name} B={b}: engine {best['engine']:.1f} tok/s, HF {best['hf']:.1f} tok/s", flush=True)
    one = rows[0] if rows[0]["batch"] == 1 else None
    for row in rows:
        if one is not None:
            row["engine_x1"] = round(row["engine_tok_s"] / one["engine_tok_s"], 2)
            row["hf_x1"] = round(row["hf_tok_s"] / one["hf_tok_s"], 2)
        row["engine_vs_hf"] = round(row["engine_tok_s"] / row["hf_tok_s"], 2)
    return rows


def table(rows: list[dict]) -> str:
    cols = [
        ("model", "model"),
        ("dtype", "dtype"),
        ("batch", "B"),
        ("prompt_tokens", "prompt tokens"),
        ("engine_tok_s", "engine tok/s"),
        ("engine_x1", "x1"),
        ("hf_tok_s", "HF tok/s"),
        ("hf_x1", "HF x1"),
        ("engine_vs_hf", "engine/HF"),
        ("today_tok_s", "today (B=1)"),
    ]
    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key, _ in cols) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "commit": commit.stdout.strip() or None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--new", type=int, default=32, help="tokens decoded per sequence (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "decode_batch.json")
    args = parser.parse_args()
    if args.new < 2 or args.repeats < 1 or min(args.batches) < 1:
        parser.error("--new must be >= 2, --repeats and every batch >= 1")
    args.batches = sorted(set(args.batches))
    info = machine()
    rows = []
    for name in args.models:
        rows += measure(name, args)
    info["load_average_end"] = os.getloadavg()
    print(table(rows))
    start, end = info["load_average_start"][0], info["load_average_end"][0]
    print(f"load average {start:.1f} at the start, {end:.1f} at the end (2 cores: above 2, the machine was shared)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
