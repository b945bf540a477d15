"""``cacheblend serve`` as a user runs it: a process of its own on a free loopback port, a model folder, a memory
tier in front of Redis (registry shared), answered over HTTP, stopped with SIGTERM. And the core package
without the server's dependencies: it imports, and ``cacheblend serve`` names the extra to install."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import torch

from tests.conftest import PASSAGES, tiny_model
from tests.store.helpers import REPO

from .conftest import free_port

CLI = "from cacheblend_rag.cli import main; main()"


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_cacheblend_serve_command(tokenizer, tmp_path, redis_url):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", seed=5).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    args = [
        sys.executable,
        "-c",
        CLI,
        "serve",
        "--model",
        str(folder),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--store",
        "memory://?max_bytes=100MB",
        "--store",
        redis_url,
        "--served-model-name",
        "tiny",
        "--max-tokens",
        "4",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"cacheblend serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                health = httpx.get(f"{url}/health", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "cacheblend serve did not answer /health in time"
                time.sleep(0.2)
        assert health["model"] == "tiny" and [t["tier"] for t in health["store"]] == ["memory", "redis"]
        assert health["shared_registry"]["available"]
        chunks = httpx.post(f"{url}/v1/chunks", json={"texts": PASSAGES}, timeout=120).json()
        assert chunks["computed"] == 3 and chunks["model"] == "tiny"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Read:\n" + "\n".join(PASSAGES)}]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        usage = answer["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0 and usage["completion_tokens"] <= 4
        proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully, then exits by the same signal
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "Traceback" not in output and "serving tiny on http://127.0.0.1" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_core_imports_without_the_server_dependencies():
    script = textwrap.dedent(
        """
        import sys
        for name in ("fastapi", "starlette", "uvicorn", "prometheus_client"):
            sys.modules[name] = None  # import fails as if not installed (pydantic stays: typer needs it)
        import cacheblend_rag, cacheblend_rag.cli, cacheblend_rag.serve
        from cacheblend_rag import CacheBlendEngine, BlendConfig
        from cacheblend_rag.store import tier_from_url
        tier_from_url("redis+cluster://127.0.0.1:1?ttl=1h", "f" * 64)
        try:
            cacheblend_rag.serve.create_app(None)
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        from cacheblend_rag.cli import main
        sys.argv = ["cacheblend", "serve", "--model", "smollm2-135m"]
        main()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True, timeout=180
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "IMPORT-ERROR: the cacheblend server needs FastAPI, uvicorn, prometheus-client" in out
    assert out.count("pip install 'cacheblend-rag[serve]'") == 2, out
