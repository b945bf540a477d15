"""``cacheblend serve`` as a user runs it: a process of its own on a free loopback port, a model folder, a memory
tier in front of Redis (registry shared), API keys from the environment and an admin key, answered over HTTP,
stopped with SIGTERM. The warnings it gives at start. And the core package without the server's dependencies:
it imports, and ``cacheblend serve`` names the extra to install."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import httpx

from tests.conftest import PASSAGES
from tests.store.helpers import REPO

from .conftest import free_port, process_env, start_process, stop_process, wait_for_health

CLI = "from cacheblend_rag.cli import main; main()"


def test_cacheblend_serve_command(model_dir, tmp_path, redis_url):
    port = free_port()
    args = [
        "-c",
        CLI,
        "serve",
        "--model",
        str(model_dir),
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
    proc = start_process(args, env={"CACHEBLEND_API_KEY": "key-one, key-two", "CACHEBLEND_ADMIN_KEY": "the-admin"})
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_for_health(proc, url)  # /health needs no key
        assert health["model"] == "tiny" and [t["tier"] for t in health["store"]] == ["memory", "redis"]
        assert health["shared_registry"]["available"]
        admin, user = {"Authorization": "Bearer the-admin"}, {"Authorization": "Bearer key-two"}
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        assert httpx.post(f"{url}/v1/chunks", json={"texts": PASSAGES}, headers=user, timeout=30).status_code == 403
        chunks = httpx.post(f"{url}/v1/chunks", json={"texts": PASSAGES}, headers=admin, timeout=120).json()
        assert chunks["computed"] == 3 and chunks["model"] == "tiny"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Read:\n" + "\n".join(PASSAGES)}]}
        body["cacheblend"] = {"exact_when_faster": False}  # so short a prompt would otherwise be computed in full
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=admin, timeout=120).json()
        usage = answer["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0 and usage["completion_tokens"] <= 4
        hidden = httpx.post(f"{url}/v1/chat/completions", json=body, headers=user, timeout=120).json()
        assert "prompt_tokens_details" not in hidden["usage"] and hidden["cacheblend"]["reuse"] == "hidden"
        assert hidden["choices"] == answer["choices"]
        proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully, then exits by the same signal
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "Traceback" not in output and "serving tiny on http://127.0.0.1" in output, output
    finally:
        stop_process(proc)


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
        [sys.executable, "-c", script], cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=180
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "IMPORT-ERROR: the cacheblend server needs FastAPI, uvicorn, prometheus-client" in out
    assert out.count("pip install 'cacheblend-rag[serve]'") == 2, out


def test_serve_warns_about_an_open_server_on_a_public_address(tmp_path):
    """Bound to every interface without a key: a warning naming --api-key, given before the model loads."""
    args = ["-c", CLI, "serve", "--model", str(tmp_path / "no-such-model"), "--host", "0.0.0.0"]
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=180
    )
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert "--host 0.0.0.0 is reachable from other machines and no --api-key is set" in out, out
    keyed = subprocess.run(
        [sys.executable, *args, "--api-key", "k"], cwd=REPO, env=process_env(), capture_output=True, text=True
    )
    assert "reachable from other machines" not in keyed.stdout + keyed.stderr


def test_every_serve_option_that_limits_or_secures_is_documented():
    """docs/SERVE.md's security model names each option that sets a key, a scope or a limit."""
    from typer.main import get_command

    from cacheblend_rag.cli import app

    command = get_command(app).commands["serve"]
    options = {opt for param in command.params for opt in getattr(param, "opts", ()) if opt.startswith("--")}
    docs = (REPO / "docs" / "SERVE.md").read_text()
    wanted = {o for o in options if any(w in o for w in ("key", "scope", "reuse", "max-", "quota", "timeout", "grace"))}
    assert len(wanted) >= 18 and not sorted(o for o in wanted if f"`{o}`" not in docs and f"`{o} " not in docs)
    assert "CACHEBLEND_API_KEY" in docs and "CACHEBLEND_ADMIN_KEY" in docs and "## Security model" in docs
