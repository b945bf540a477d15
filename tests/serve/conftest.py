"""Servers for the serve tests: the server ``cacheblend serve`` runs (uvicorn with the connection limits, the
shutdown that tells the app first) on a free loopback port in a thread, over engines built here.

The Redis fixtures of the store tests (a shared Redis with a per-test key prefix, a private redis-server a
test may stop) are used here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("prometheus_client", reason="the server tests need the serve extra: pip install -e '.[serve]'")

import httpx

from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.serve import create_app
from cacheblend_rag.serve.protocol import ServerLimits
from cacheblend_rag.serve.server import build_server
from tests.conftest import tiny_model
from tests.store.conftest import free_port, private_redis, redis_base_url, redis_url  # noqa: F401
from tests.store.helpers import REPO

MODEL = "tiny-random-llama"


class LiveServer:
    """The server serving ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app, limits: ServerLimits | None = None) -> None:
        self.app = app
        self.port = free_port()
        self.server = build_server(app, "127.0.0.1", self.port, limits=limits, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def serving(engine, limits: ServerLimits | None = None, **options) -> Iterator[LiveServer]:
    app = create_app(engine, model_name=options.pop("model_name", MODEL), **options)
    if isinstance(engine, PacedEngine):
        app.state.server.scheduler.batch.before_decode = engine.wait_permit
    server = LiveServer(app, limits).start()
    try:
        yield server
    finally:
        server.stop()


def tiny_engine(tokenizer, cache_dir, store=None, seed: int = 0, cls=CacheBlendEngine) -> CacheBlendEngine:
    """An engine over a tiny random Llama (fp32, so reuse is exact) with the SmolLM2 tokenizer and chat template."""
    return cls(
        tiny_model("llama", seed),
        tokenizer,
        store=store or ["memory://?max_bytes=1GB"],
        store_dtype=torch.float32,
        cache_dir=cache_dir,
    )


def chat(messages_or_text, **body) -> dict:
    messages = messages_or_text
    if isinstance(messages_or_text, str):
        messages = [{"role": "user", "content": messages_or_text}]
    return {"model": MODEL, "messages": messages, **body}


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event of a streamed response (JSON objects, and the final "[DONE]")."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class PacedEngine(CacheBlendEngine):
    """The real engine, but each decoding step of the server's batch (a text piece of every running request) and
    each step of a /v1/chunks job waits for a permit the test gives (``step``), so a test decides when decoding
    moves on, and a request stays running (or queued behind it) as long as it likes. ``serving`` hooks it into the
    server's batch (``BatchLoop.before_decode``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.permits = threading.Semaphore(0)
        self.paced = True
        self.taken = 0  # permits used

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def unpace(self) -> None:
        self.paced = False
        self.permits.release()

    def wait_permit(self, what: str = "decode") -> None:
        if self.paced:
            if not self.permits.acquire(timeout=120):
                raise RuntimeError(f"the test gave no permit to {what} on")
            self.taken += 1

    def attach(self, texts, *args, **kwargs):
        """Each call (one step of a /v1/chunks job) waits for a permit too."""
        self.wait_permit("attach")
        return super().attach(texts, *args, **kwargs)


def wait_until(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama (fp32) with the SmolLM2 tokenizer, saved as a model folder a server process loads."""
    folder = tmp_path_factory.mktemp("served-model") / "tiny-llama"
    tiny_model("llama", seed=5).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def process_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_process(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A server process (``python args...``) run from the repository with ``env`` added to the environment, its
    output (stdout and stderr) in one pipe."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**process_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_for_health(proc: subprocess.Popen, url: str, timeout: float = 180) -> dict:
    """/health of a server process once it answers (fails with its output if it exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return httpx.get(f"{url}/health", timeout=5).json()
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not answer /health in time"
            time.sleep(0.2)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
