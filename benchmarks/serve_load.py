"""Load check of ``cacheblend serve``: two replicas sharing one Redis, many streaming clients, one replica killed.

Everything runs on loopback and stops by itself: a private redis-server on a free port (or --redis), two
``cacheblend serve`` processes on free ports, each with a memory tier in front of the shared Redis and the
shared chunk registry. The chunks (paragraphs of the bundled corpus) are registered through replica A only.

Phase "load": --clients threads each send --requests streamed chat completions, alternating between the two
replicas as a round-robin load balancer would; a 429 is retried after its Retry-After (at most 5 tries).
Reported per replica: requests, 200s, clean 429s (status 429 with Retry-After and a JSON error), other
errors, client-side TTFT p50/p99 (request sent -> first content piece) and reuse (cached_tokens /
prompt_tokens from the usage chunk).
Phase "kill": --kill-clients long streams on each replica; once every one has its first piece, replica B
gets SIGKILL. B's clients must see an error (a cut stream, no [DONE]), A's must finish, and A must go on
answering new requests.

    python benchmarks/serve_load.py --model smollm2-135m --clients 16 --requests 10 --json load.json

Bounded: --clients x --requests requests at most, and no request starts after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serve_common import REPO, ServeProcess, free_port, paragraphs, percentile, stream_chat

sys.path.insert(0, str(REPO))

from cacheblend_rag_app.sample_questions import QUESTIONS


def words(text: str) -> set[str]:
    return {w.strip(".,?!:;'\"()").lower() for w in text.split() if len(w) > 3}


def prompt_for(question: str, chunks: list[str], k: int) -> list[dict]:
    """The k paragraphs sharing the most words with the question (a lexical retriever), in a chat prompt."""
    top = sorted(chunks, key=lambda c: -len(words(c) & words(question)))[:k]
    context = "\n\n".join(top)
    return [
        {"role": "system", "content": "Answer the question from the context, in a few words."},
        {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
    ]


class Replica(ServeProcess):
    """A replica of the load check: ``stores`` its tiers, ``args`` its limits, device, dtype and torch threads."""

    def __init__(self, name: str, model: str, stores: list[str], workdir: Path, args) -> None:
        options = ["--model", model, "--served-model-name", "model", "--max-active", str(args.max_active)]
        options += ["--max-queue", str(args.max_queue), "--device", args.device, "--dtype", args.dtype]
        options += ["--log-level", "warning", *(x for store in stores for x in ("--store", store))]
        env = {"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
        super().__init__(name, options, workdir / f"replica-{name}.log", env=env)


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server), or pass --redis URL")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "allkeys-lru",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


RECORDED = ("status", "ttft", "usage", "done", "error", "retry_after")  # what the JSON keeps of a stream


def stream(url: str, messages: list[dict], max_tokens: int, on_first=None) -> dict:
    """One streamed chat completion: status, TTFT, usage, whether it ended with [DONE], the error if any."""
    record = stream_chat(url, messages, max_tokens, on_first=on_first)
    return {key: record[key] for key in RECORDED if key in record}


def load_phase(replicas: list[Replica], chunks: list[str], args) -> list[dict]:
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.time_limit

    def client(i: int) -> None:
        rng = random.Random(i)
        for j in range(args.requests):
            if time.monotonic() > deadline:
                return
            replica = replicas[(i + j) % len(replicas)]  # round-robin, as a load balancer would
            question = rng.choice(QUESTIONS).question
            for _attempt in range(5):
                result = stream(replica.url, prompt_for(question, chunks, args.k), args.max_tokens)
                result["replica"] = replica.name
                with lock:
                    results.append(result)
                if result["status"] != 429:
                    break
                time.sleep(float(result.get("retry_after") or 1))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def kill_phase(a: Replica, b: Replica, chunks: list[str], args) -> dict:
    started = threading.Barrier(2 * args.kill_clients + 1, timeout=600)
    results: dict[str, list] = {"A": [], "B": []}

    def client(replica: Replica, i: int) -> None:
        first = []

        def on_first():
            first.append(True)
            started.wait()

        question = QUESTIONS[i % len(QUESTIONS)].question
        result = stream(replica.url, prompt_for(question, chunks, args.k), 128, on_first=on_first)
        if not first:  # failed before its first piece: do not keep the others waiting
            started.abort()
        results[replica.name].append(result)

    threads = [threading.Thread(target=client, args=(r, i)) for r in (a, b) for i in range(args.kill_clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        started.wait()  # every stream has its first piece: kill B mid-stream
    os.kill(b.proc.pid, signal.SIGKILL)
    for t in threads:
        t.join()
    after = [stream(a.url, prompt_for(q.question, chunks, args.k), 8) for q in QUESTIONS[:4]]
    return {"A": results["A"], "B": results["B"], "A after": after}


def summarize(label: str, results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["done"] and not r["error"]]
    clean_429 = [r for r in results if r["status"] == 429 and r.get("retry_after") and r["error"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    prompt = sum(r["usage"]["prompt_tokens"] for r in ok if r["usage"])
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in ok if r["usage"])
    return {
        "what": label,
        "requests": len(results),
        "ok": len(ok),
        "clean_429": len(clean_429),
        "errors": len(results) - len(ok) - len(clean_429),
        "ttft_p50_s": percentile(ttfts, 50, "rank"),
        "ttft_p99_s": percentile(ttfts, 99, "rank"),
        "reuse": cached / prompt if prompt else 0.0,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| what | requests | 200 | clean 429 | errors | TTFT p50 | TTFT p99 | reused / prompt tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p50 = f"{r['ttft_p50_s']:.2f} s" if r["ttft_p50_s"] is not None else "-"
        p99 = f"{r['ttft_p99_s']:.2f} s" if r["ttft_p99_s"] is not None else "-"
        lines.append(
            f"| {r['what']} | {r['requests']} | {r['ok']} | {r['clean_429']} | {r['errors']} | {p50} | {p99} "
            f"| {r['reuse']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", help="the same on every replica (auto may differ)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="chunks per prompt")
    parser.add_argument("--max-active", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--kill-clients", type=int, default=3, help="streams per replica in the kill phase")
    parser.add_argument("--time-limit", type=float, default=900, help="no load request starts after this (s)")
    parser.add_argument("--redis", help="a Redis URL to use instead of a private redis-server")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cacheblend-load-"))
    redis_proc = None
    replicas: list[Replica] = []
    try:
        if args.redis:
            redis_url = args.redis
        else:
            redis_proc, redis_url = start_redis(workdir)
        prefix = f"load-{os.getpid()}:"
        store = ["memory://?max_bytes=1GB", f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"]
        replicas = [Replica(name, args.model, store, workdir, args) for name in ("A", "B")]
        for replica in replicas:
            replica.wait_ready(300)
        a, b = replicas
        prints = {httpx.get(f"{r.url}/health", timeout=30).json()["model_fingerprint"] for r in replicas}
        if len(prints) != 1:
            raise SystemExit(f"the replicas run different models or dtypes ({prints}): they would share nothing")
        chunks = paragraphs()
        t = time.perf_counter()
        registered = httpx.post(f"{a.url}/v1/chunks", json={"texts": chunks}, timeout=1800).json()
        print(
            f"registered {len(chunks)} chunks through replica A ({registered['computed']} computed) in "
            f"{time.perf_counter() - t:.1f}s",
            flush=True,
        )

        t = time.perf_counter()
        load = load_phase(replicas, chunks, args)
        load_s = time.perf_counter() - t
        b_metrics = httpx.get(f"{b.url}/metrics", timeout=30).text
        rows = [summarize(f"load, replica {r.name}", [x for x in load if x["replica"] == r.name]) for r in replicas]
        rows.append(summarize("load, both", load))
        killed = kill_phase(a, b, chunks, args)
        rows += [
            summarize("kill: streams on A", killed["A"]),
            summarize("kill: streams on B (killed)", killed["B"]),
            summarize("kill: A afterwards", killed["A after"]),
        ]
        print(
            f"\nload phase: {len(load)} requests in {load_s:.0f}s ({args.clients} clients x {args.requests} "
            f"requests, max_tokens {args.max_tokens}, {args.k} chunks per prompt)\n"
        )
        print(table(rows))
        for line in b_metrics.splitlines():
            if line.startswith(
                (
                    "cacheblend_store_hits_total",
                    "cacheblend_engine_precomputed_chunks_total",
                    "cacheblend_shared_registry_received_total",
                )
            ):
                print("replica B:", line)
        b_errors = {r["error"] for r in killed["B"]}
        print(f"\nreplica B's clients after SIGKILL: {sorted(e or 'no error' for e in b_errors)}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"args": vars(args) | {"json": str(args.json)}, "rows": rows, "load": load, "kill": killed},
                    indent=2,
                    default=str,
                )
            )
    finally:
        for replica in replicas:
            replica.stop(wait=30)
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
