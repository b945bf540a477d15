"""The connection layer over raw sockets: a request head or body that never finishes is timed out (408), a body
past its limit refused (413), connections past the limit answered 503 and closed, a broken request answered in
JSON; a server whose descriptor limit is low keeps answering /health under a flood of idle connections and
writes a few log lines, not hundreds of thousands; repeated log records are rate-limited."""

from __future__ import annotations

import json
import logging
import resource
import signal
import socket
import time

import httpx
import pytest

from cacheblend_rag.serve.protocol import RateLimit, ServerLimits

from .conftest import MODEL, chat, free_port, serving, start_process, stop_process, tiny_engine, wait_for_health

CLI = "from cacheblend_rag.cli import main; main()"


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    engine = tiny_engine(tokenizer, tmp_path_factory.mktemp("connections"))
    limits = ServerLimits(header_timeout=0.5, keep_alive_timeout=5, max_connections=4)
    with serving(engine, limits=limits, body_timeout=0.5, max_body_bytes=4000) as server:
        yield server


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict]:
    """Read until the server closes the connection; the status and JSON body of its response."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_request_head_that_never_ends_is_timed_out(live):
    silent, partial = connect(live), connect(live)
    partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    for sock in (silent, partial):
        status, body = answer(sock)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert "--header-timeout" in body["error"]["message"]
        sock.close()
    assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200


def test_a_body_that_never_ends_is_timed_out_and_a_large_one_refused(live):
    slow = connect(live)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"model": ')
    status, body = answer(slow)
    assert status == 408 and "--body-timeout" in body["error"]["message"]
    big = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x" * 5000}, timeout=30)
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["error"]["message"]
    chunked = httpx.post(f"{live.url}/v1/completions", content=(b"x" * 1000 for _ in range(5)), timeout=30)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{live.url}/v1/chat/completions", json=chat("hi", max_tokens=2), timeout=60).status_code == 200


def test_connections_past_the_limit_are_answered_503_and_a_bad_request_in_json(live):
    held = [connect(live) for _ in range(4)]
    try:
        time.sleep(0.1)  # let the server accept them
        extra = connect(live)
        status, body = answer(extra)
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        assert "--max-connections" in body["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    broken = connect(live)
    broken.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, body = answer(broken)
    assert status == 400 and body["error"]["code"] == "invalid_http"
    assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200


def test_repeated_log_records_are_rate_limited():
    now = [0.0]
    limit = RateLimit(burst=3, window=60, clock=lambda: now[0])
    logger = logging.getLogger("tests.serve.rate-limited")
    logger.addFilter(limit)
    try:
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        for i in range(1000):
            logger.warning("socket.accept() out of system resource (%d)", i)
        logger.warning("another message")
        assert len(records) == 4
        now[0] = 61.0
        logger.warning("socket.accept() out of system resource (%d)", 1000)  # a new window: the count is told
        assert "997 similar messages suppressed in the last 60s" in records[-1].getMessage()
    finally:
        logger.removeFilter(limit)
        logger.removeHandler(handler)


def test_a_flood_of_idle_connections_past_the_descriptor_limit(model_dir, tmp_path):
    """The process may open 256 descriptors: the server serves fewer connections (and says so), refuses the
    rest at once, times out the idle ones, answers /health and logs a few dozen lines throughout."""
    port = free_port()
    args = ["-c", CLI, "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu"]
    args += ["--dtype", "float32", "--cache-dir", str(tmp_path / "cache"), "--store", "memory://?max_bytes=100MB"]
    args += ["--header-timeout", "5", "--log-level", "info"]

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = start_process(args, preexec_fn=low_limit)
    socks = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(proc, url)
        for _ in range(400):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        answers = []
        for sock in socks:  # past the limit: 503 at once; within it: 408 once the head is overdue
            sock.settimeout(60)
            answers.append(sock.recv(65536).split(b"\r\n", 1)[0])
        assert set(answers) == {b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 408 Request Timeout"}
        health = None
        deadline = time.monotonic() + 60
        while health is None and time.monotonic() < deadline:  # the idle ones time out: room again
            try:
                health = httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200
    finally:
        for sock in socks:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            stop_process(proc)
    output = proc.stdout.read()
    assert "serving at most 96 connections (backlog 48)" in " ".join(output.split()), output
    assert "Too many open files" not in output and "Traceback" not in output, output[-3000:]
    assert len(output.splitlines()) < 60, output[-3000:]
