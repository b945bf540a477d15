"""What the serving benchmarks share (serve_load.py, serve_batching.py, serve_probe.py): a free loopback port, the
bundled corpus' paragraphs, a percentile, a ``cacheblend serve`` process that is started, waited for and stopped,
and one streamed chat completion timed piece by piece.

Nothing here runs at import: no process starts and no argument is read until a script calls it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "cacheblend_rag" / "data" / "corpus"
# the CLI's serve command, run by this Python (``python -c`` imports from its working directory first)
SERVE = [sys.executable, "-c", "from cacheblend_rag.cli import main; main()", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paragraphs() -> list[str]:
    """The bundled corpus' paragraphs of at least 200 characters, headings left out, in file order."""
    out = []
    for path in sorted(CORPUS.glob("*.md")):
        for block in path.read_text().split("\n\n"):
            block = block.strip()
            if len(block) >= 200 and not block.startswith("#"):
                out.append(block)
    return out


def percentile(values: list[float], q: float, method: str) -> float | None:
    """The q-th percentile of ``values`` as one of them (None when there are none). ``method="index"``: the value at
    index round(q/100 * (n-1)) of the sorted values (serve_batching's tables); ``method="rank"``: the
    round(q/100 * n + 0.5)-th smallest, about the nearest rank (serve_load's tables). Both round half to even, as
    Python's ``round`` does; each script keeps its own so that its tables compare with their earlier runs."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    if method == "index":
        return ordered[min(n - 1, round(q / 100 * (n - 1)))]
    if method == "rank":
        return ordered[min(n - 1, max(0, round(q / 100 * n + 0.5) - 1))]
    raise ValueError(f"percentile method must be 'index' or 'rank', got {method!r}")


class ServeProcess:
    """``cacheblend serve`` in a subprocess on a free loopback port, its output in ``log_path``.

    ``options`` follow ``serve --port PORT`` (the model, the stores, the limits); ``env`` is added to this process'
    environment (with the Hugging Face hub offline and tokenizers single-threaded); ``wrap`` goes before the command
    (e.g. a shell that sets a ulimit); ``cwd`` is the checkout whose package ``python -c`` imports first.
    """

    def __init__(
        self,
        name: str,
        options: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        wrap: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*wrap, *SERVE, "--port", str(self.port), *options]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self, timeout: float = 600) -> bool:
        """Whether ``/health`` answered 200 within ``timeout`` seconds (False at once if the process exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return True
            time.sleep(0.5)
        return False

    def wait_ready(self, timeout: float = 600) -> None:
        """``ready``, or a RuntimeError that says whether the process exited or never answered, and where its log is."""
        if self.ready(timeout):
            return
        what = f"cacheblend serve ({self.name})"
        if self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {self.proc.returncode}; see {self.log_path}")
        raise RuntimeError(f"{what} did not answer /health in {timeout:.0f}s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, wait: float = 60) -> None:
        """Send ``sig``, wait up to ``wait`` seconds, then SIGKILL; close the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def refusal(response: httpx.Response) -> str | None:
    """The message of a non-200 answer's JSON error (None without one), or its status and first bytes if not JSON."""
    try:
        data = response.json()
    except ValueError:
        return f"{response.status_code}: {response.text[:200]!r}"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error.get("message")
    return None if error is None else str(error)


def stream_chat(
    url: str,
    messages: list[dict],
    max_tokens: int,
    *,
    extra: dict | None = None,
    timeout: float = 300,
    on_first=None,
) -> dict:
    """One streamed chat completion (usage asked for) to the server at ``url``, ``extra`` added to the body.

    The record: ``status``; ``sent`` and ``pieces``, the ``time.perf_counter()`` when the request was sent and when
    each content piece arrived; ``ttft`` (first piece - sent); ``usage`` (from the usage chunk); ``done`` (it ended
    with [DONE]); ``error`` (the server's message, or the transport's failure); when the answer is not a 200, its
    ``retry_after`` header. ``on_first()`` is called as the first piece arrives.
    """
    body = {"model": "model", "messages": messages, "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    record: dict = {"status": None, "sent": time.perf_counter(), "pieces": [], "ttft": None, "usage": None}
    record |= {"done": False, "error": None}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as response:
            record["status"] = response.status_code
            if response.status_code != 200:
                response.read()
                record["retry_after"] = response.headers.get("retry-after")
                record["error"] = refusal(response)
                return record
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    record["done"] = True
                    break
                event = json.loads(line[len("data: ") :])
                if "error" in event:  # the stream's last event
                    record["error"] = event["error"]["message"]
                    break
                if event.get("usage"):
                    record["usage"] = event["usage"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        record["pieces"].append(time.perf_counter())
                        if record["ttft"] is None:
                            record["ttft"] = record["pieces"][0] - record["sent"]
                            if on_first is not None:
                                on_first()
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record
