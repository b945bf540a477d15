"""Batched serving under concurrency: one ``cacheblend serve`` replica, 1 to 16 streaming clients at once.

A real server process on loopback (memory tier, no Redis), the bundled corpus' paragraphs registered through
``POST /v1/chunks``. For each kind of prompt and each concurrency C, --requests streamed chat completions are sent
by C client threads (each sends its share one after the other; C=1 is the same requests one at a time):

- ``rag``: 4 registered paragraphs and a request for a summary (the chunks are reused);
- ``plain``: a short request for a story (no chunk).

Reported per row: aggregate completion tokens/s (all tokens / wall time), TTFT p50/p99 (request sent -> first
content piece), inter-token latency p50/p99 (gaps between a stream's pieces), and the decode phase's tokens/s
while C streams decode at once (pieces arriving while all C are between their first and last piece). Then the
ratios the scheduler is held to: decode phase at 16 vs one stream, end to end at 16 vs one at a time, inter-token
p99 at 16 vs a lone stream. Before the server starts, a lone request (the plain prompt, --max-tokens new tokens,
EOS ignored) is timed in this process through ``engine.generate`` and Hugging Face ``generate`` on the same model
and dtype: TTFT and decode tokens/s, beside the server's lone stream.

    python benchmarks/serve_batching.py --model smollm2-135m --json results/serve_batching_smollm2.json

Run on a quiet machine, or compare the ratios within one run: every configuration runs back to back.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serve_common import REPO, ServeProcess, paragraphs, percentile, stream_chat

RAG_ASK = "Using only the passages above, write a detailed summary of everything they say."
PLAIN_ASK = "Write a long story about {topic}, with many details."
TOPICS = ["a lighthouse keeper", "a fishing village", "a storm at sea", "an old harbour", "a ferry crossing"]


def messages(kind: str, i: int, chunks: list[str]) -> list[dict]:
    if kind == "plain":
        return [{"role": "user", "content": PLAIN_ASK.format(topic=TOPICS[i % len(TOPICS)])}]
    picked = random.Random(i).sample(chunks, 4)
    return [{"role": "user", "content": "\n\n".join(picked) + "\n\n" + RAG_ASK}]


def pct(values: list[float], q: float) -> float | None:
    return percentile(values, q, "index")


def lone_in_process(args) -> dict:
    """TTFT and decode tokens/s of the plain prompt through engine.generate and Hugging Face generate."""
    import torch

    from cacheblend_rag import CacheBlendEngine

    engine = CacheBlendEngine.from_pretrained(args.model, device="cpu", dtype=args.dtype, store=["memory://"])
    engine.eos_token_ids = frozenset()  # a fixed length, as Hugging Face's min_new_tokens gives
    msgs = messages("plain", 0, [])
    out: dict = {}
    best: dict = {}
    for _ in range(args.repeats):
        stats = engine.generate(messages=msgs, max_new_tokens=args.max_tokens).stats
        rate = (stats.new_tokens - 1) / stats.decode_s
        if not best or stats.ttft_s < best["ttft_s"]:
            best = {"ttft_s": stats.ttft_s, "decode_tok_s": rate, "prompt_tokens": stats.prompt_tokens}
    out["engine.generate"] = best
    ids = torch.tensor([engine.prompt_format.chat_ids(msgs)])
    model = engine.model
    times = {}
    for n in (1, args.max_tokens):
        spent = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            spent.append(time.perf_counter() - t)
        times[n] = min(spent)
    rate = (args.max_tokens - 1) / (times[args.max_tokens] - times[1])
    out["huggingface.generate"] = {"ttft_s": times[1], "decode_tok_s": rate, "prompt_tokens": ids.shape[1]}
    del engine, model
    return out


class Server(ServeProcess):
    """The one replica: a memory tier, its own registry, as many active streams as the largest concurrency."""

    def __init__(self, args, workdir: Path) -> None:
        options = ["--model", args.model, "--served-model-name", "model", "--dtype", args.dtype, "--device", "cpu"]
        options += ["--store", "memory://?max_bytes=2GB", "--no-share-registry", "--log-level", "warning"]
        options += ["--max-active", str(max(args.concurrency)), "--max-queue", "256"]
        options += ["--max-tokens", str(args.max_tokens)]
        if args.prefill_budget:
            options += ["--prefill-budget", str(args.prefill_budget)]
        # --server-repo runs another checkout's server: python -c imports from its working directory first
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        super().__init__("server", options, workdir / "server.log", env=env, cwd=args.server_repo)


def stream_one(url: str, msgs: list[dict], max_tokens: int, blend: dict | None = None) -> dict:
    """One streamed chat completion: when it was sent, when each content piece arrived, its usage."""
    extra = {"cacheblend": blend} if blend else None
    return stream_chat(url, msgs, max_tokens, extra=extra, timeout=600)


def run_load(url: str, kind: str, clients: int, args, chunks: list[str]) -> list[dict]:
    """args.requests requests of ``kind`` from ``clients`` threads (request i goes to thread i % clients)."""
    records: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(c, args.requests, clients):
            record = stream_one(url, messages(kind, i, chunks), args.max_tokens, getattr(args, "blend", None))
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def decode_phase_rate(records: list[dict], streams: int) -> float | None:
    """Tokens/s of the pieces that arrived while ``streams`` streams were between their first and last piece."""
    spans = [(r["pieces"][0], r["pieces"][-1]) for r in records if len(r["pieces"]) >= 2]
    edges = sorted({t for span in spans for t in span})
    total_time = pieces = 0.0
    for a, b in itertools.pairwise(edges):
        if sum(1 for s, e in spans if s <= a and b <= e) >= streams:
            total_time += b - a
            pieces += sum(1 for r in records for t in r["pieces"][1:] if a < t <= b)
    return pieces / total_time if total_time > 0 else None


def summarize(records: list[dict], clients: int) -> dict:
    ok = [r for r in records if r["error"] is None and r["pieces"]]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r["usage"])
    wall = max(r["pieces"][-1] for r in ok) - min(r["sent"] for r in records) if ok else 0.0
    gaps = [b - a for r in ok for a, b in itertools.pairwise(r["pieces"])]
    ttft = [r["pieces"][0] - r["sent"] for r in ok]
    prompt = sum(r["usage"]["prompt_tokens"] for r in ok if r["usage"])
    cached = sum(r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in ok if r["usage"])
    return {
        "clients": clients,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall else None,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(gaps, 50),
        "itl_p99": pct(gaps, 99),
        "decode_tok_s": decode_phase_rate(ok, clients),
        "reused_share": cached / prompt if prompt else 0.0,
        "prompt_tokens_mean": prompt / len(ok) if ok else 0,
    }


def ratios(rows: list[dict]) -> dict:
    """The scheduler's targets, from one kind's rows (needs 1 and the largest concurrency)."""
    by = {r["clients"]: r for r in rows}
    one, top = by.get(1), by.get(max(by))
    if one is None or top is None or top is one:
        return {}

    def div(a, b):
        return round(a / b, 2) if a is not None and b else None

    return {
        "clients": top["clients"],
        "decode_x_one_stream": div(top["decode_tok_s"], one["decode_tok_s"]),
        "end_to_end_x_one_at_a_time": div(top["tok_s"], one["tok_s"]),
        "itl_p99_x_lone": div(top["itl_p99"], one["itl_p99"]),
    }


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(report: dict) -> None:
    print(
        f"\n{report['model']} ({report['dtype']}), {report['requests']} requests per row, max_tokens "
        f"{report['max_tokens']}, load {report['load_before']} -> {report['load_after']}"
    )
    print("| prompts | clients | tok/s | decode tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | reused | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, rows in report["rows"].items():
        for r in rows:
            ms = [fmt(r[k] and r[k] * 1000, 0) for k in ("itl_p50", "itl_p99")]
            print(
                f"| {kind} | {r['clients']} | {fmt(r['tok_s'])} | {fmt(r['decode_tok_s'])} | {fmt(r['ttft_p50'])} s | "
                f"{fmt(r['ttft_p99'])} s | {ms[0]} ms | {ms[1]} ms | {r['reused_share']:.0%} | {r['errors']} |"
            )
    for kind, value in report["ratios"].items():
        print(f"ratios ({kind}): {value}")
    print("| lone request | TTFT | decode tok/s |")
    print("|---|---:|---:|")
    for name, row in report["lone"].items():
        print(f"| {name} | {fmt(row['ttft_s'], 3)} s | {fmt(row['decode_tok_s'])} |")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", help="the server's and the in-process engine's dtype")
    parser.add_argument("--concurrency", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=16, help="requests per row")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kinds", default="rag,plain", type=lambda s: s.split(","))
    parser.add_argument("--prefill-budget", type=int, default=None, help="the server's --prefill-budget")
    parser.add_argument(
        "--blend",
        type=json.loads,
        default=None,
        help='per-request blend options, e.g. \'{"selection": "deviation"}\' (the cacheblend body field)',
    )
    parser.add_argument("--repeats", type=int, default=2, help="in-process lone runs (the best is kept)")
    parser.add_argument(
        "--server-repo",
        type=Path,
        default=REPO,
        help="the checkout whose server runs (e.g. an "
        "export of an older commit, to compare with); the lone in-process runs use this one",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report: dict = {"model": args.model, "dtype": args.dtype, "requests": args.requests, "max_tokens": args.max_tokens}
    report["server_repo"], report["blend"] = str(args.server_repo), args.blend
    report["load_before"] = loadavg()
    report["lone"] = lone_in_process(args)
    chunks = paragraphs()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args, Path(tmp))
        try:
            server.wait_ready()
            registered = httpx.post(f"{server.url}/v1/chunks", json={"model": "model", "texts": chunks}, timeout=3600)
            registered.raise_for_status()
            run_load(server.url, "plain", 2, argparse.Namespace(requests=2, max_tokens=8), chunks)  # warm-up
            report["rows"], report["ratios"] = {}, {}
            for kind in args.kinds:
                rows = [summarize(run_load(server.url, kind, c, args, chunks), c) for c in args.concurrency]
                report["rows"][kind], report["ratios"][kind] = rows, ratios(rows)
            lone = report["rows"][args.kinds[-1]][0]
            report["lone"]["server (1 client)"] = {"ttft_s": lone["ttft_p50"], "decode_tok_s": lone["decode_tok_s"]}
        finally:
            server.stop()
    report["load_after"] = loadavg()
    report["chunks"] = len(chunks)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
