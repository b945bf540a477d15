"""What the hostile probe of ``cacheblend serve`` (serve_probe.py) is made of: its constants, the replicas it
starts (the CLI, on loopback), and the small readers of their answers."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import httpx
import redis
from serve_common import REPO, SERVE, ServeProcess

MODEL = "smollm2-135m"
CLI = [*SERVE, "--model", MODEL]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
INSTRUCTION = "Answer the question in one short sentence, using only the facts given in the context."
FACT = "The Eiffel Tower is in Paris, France. It was completed in 1889 and is 330 metres tall."
SECRET = " ".join(f"K1's private note {i}: account {i * 7919} holds {i * 31} units." for i in range(60))
QUESTIONS = ["What is the capital of Japan?", "Name a primary colour.", "What is 2 + 3?", "Which planet is red?"]
KEYS = {"K1": "k1-" + "a" * 40, "K2": "k2-" + "b" * 40, "ADM": "adm-" + "c" * 40}
PREFIX_CACHE = {"cacheblend": {"strategy": "prefix_cache"}}


def blended(extra: dict) -> dict:
    """A request's extra fields with ``exact_when_faster`` off: the probe's prompts are short, and the cost model
    would compute them in full (reusing nothing, so no reuse to probe) unless a request says otherwise."""
    return {**extra, "cacheblend": {"exact_when_faster": False, **extra.get("cacheblend", {})}}


FULL = {"cacheblend": {"strategy": "full_recompute"}}
UNSUPPORTED = json.loads(
    '{"top_logprobs": 2, "tool_choice": "auto", "function_call": "auto", "parallel_tool_calls": true, "logprobs": '
    'true, "n": 2, "logit_bias": {"1": 1}, "presence_penalty": 0.5, "tools": [{"x": 1}], "response_format": {"type": '
    '"json_object"}, "seed": 1180591620717411303424, "stop": ["a", "b", "c", "d", "e"]}'
)
ROWS: list[dict] = []


def row(item: str, probe: str, figure, ok: bool) -> None:
    ROWS.append({"item": item, "probe": probe, "figure": str(figure), "ok": bool(ok)})
    print(f"[{'ok' if ok else 'FAIL'}] {item} {probe}: {figure}", flush=True)


def rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next((int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:")), -1)


class Replica(ServeProcess):
    """``cacheblend serve`` in a process: ``args`` are extra CLI options, ``nofile`` a ``ulimit -n``."""

    def __init__(self, name: str, redis_url: str, workdir: Path, args=(), nofile: int | None = None) -> None:
        options = ["--model", MODEL, "--dtype", "bfloat16", "--store", "memory://?max_bytes=1GB"]
        options += ["--store", redis_url, *args]
        wrap = ["bash", "-c", f'ulimit -n {nofile} && exec "$@"', "_"] if nofile else []
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        super().__init__(name, options, workdir / f"replica-{name}.log", env=env, wrap=wrap)

    def call(self, path: str, body=None, key: str | None = None, raw: bytes | None = None, timeout: float = 300):
        """(status, JSON or text, headers, seconds); GET without a body."""
        headers = {"Authorization": f"Bearer {KEYS.get(key, key)}"} if key else {}
        t = time.perf_counter()
        if body is None and raw is None:
            r = httpx.get(self.url + path, headers=headers, timeout=timeout)
        else:
            content = raw if raw is not None else json.dumps(body)
            headers["content-type"] = "application/json"
            r = httpx.post(self.url + path, content=content, headers=headers, timeout=timeout)
        try:
            data = r.json()
        except ValueError:
            data = r.text
        return r.status_code, data, r.headers, time.perf_counter() - t

    def chat(self, messages, key=None, max_tokens=8, **extra):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **blended(extra)}
        return self.call("/v1/chat/completions", body, key)

    def complete(self, prompt: str, **extra):
        return self.call("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8, **blended(extra)})[1]

    def health(self) -> dict:
        return self.call("/health")[1]


def start(*replicas: Replica) -> None:
    for r in replicas:
        if not r.ready():
            raise SystemExit(f"replica {r.name} did not start: see {r.log_path}")


def text_of(data) -> str | None:
    if not isinstance(data, dict) or "choices" not in data:
        return None
    choice = data["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def code(data) -> str | None:
    return (data.get("error") or {}).get("code") if isinstance(data, dict) else None


def error_shaped(data) -> bool:
    err = data.get("error") if isinstance(data, dict) else None
    return (
        isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err) and not str(err["param"]).isdigit()
    )


def hits(data) -> int:
    return (data.get("cacheblend") or {}).get("cache_hits", 0) if isinstance(data, dict) else 0


def cached(data) -> int | None:
    details = (data.get("usage") or {}).get("prompt_tokens_details") if isinstance(data, dict) else None
    return None if details is None else details.get("cached_tokens")


def registry_keys(r: redis.Redis, scoped: bool = False) -> list[bytes]:
    return [k for k in r.scan_iter(match="*registry:*") if k.count(b":") == (4 if scoped else 3)]


def during(fn, probe_url: str) -> tuple[object, float]:
    """Run ``fn`` in a thread while polling ``probe_url``; returns (fn's result, the slowest poll in seconds)."""
    out, slowest = {}, 0.0
    thread = threading.Thread(target=lambda: out.setdefault("r", fn()))
    thread.start()
    time.sleep(0.05)
    while thread.is_alive():
        t = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(probe_url, timeout=60)
        slowest = max(slowest, time.perf_counter() - t)
        time.sleep(0.05)
    thread.join()
    return out.get("r"), slowest


# ---- phase open ------------------------------------------------------------------------------------------
