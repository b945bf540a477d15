"""Redis for the store tests: the server CI starts (CACHEBLEND_TEST_REDIS), else a private redis-server.

Tests that stop or pause Redis get their own server (``private_redis``), so they never disturb the others.
Every test gets its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

NO_REDIS = (
    "no Redis server: set CACHEBLEND_TEST_REDIS=redis://127.0.0.1:PORT/0 (CI's .ci/run does) or install "
    "redis-server (apt-get install -y redis-server) so the tests can start one"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(url: str) -> bool:
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
        return True
    except Exception:
        return False


class RedisServer:
    """A redis-server process of our own on loopback, without persistence; ``stop``/``start`` keep the port."""

    def __init__(self, workdir: Path, extra: list[str] | None = None, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.binary, self.workdir, self.extra = binary, workdir, extra or []
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ping_url: str | None = None) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not reachable(ping_url or self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}: {' '.join(args)}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_base_url(tmp_path_factory) -> str:
    """URL of a Redis the tests may write to (under their own prefixes)."""
    url = os.environ.get("CACHEBLEND_TEST_REDIS")
    if url:
        if not reachable(url):
            pytest.skip(f"CACHEBLEND_TEST_REDIS={url} is set but no Redis answers there")
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_base_url):
    """The shared Redis with a key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"cbtest-{uuid.uuid4().hex[:12]}:"
    sep = "&" if "?" in redis_base_url else "?"
    yield f"{redis_base_url}{sep}prefix={prefix}"
    client = redis.Redis.from_url(redis_base_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, which the test may stop, restart or pause."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
