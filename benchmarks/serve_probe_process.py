"""The hostile probe's probes of the server process and its connections: half-sent requests, SIGTERM, a
descriptor flood (serve_probe.py runs them)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import httpx
from serve_probe_common import (  # the probe's constants, the replicas it starts, the readers of answers
    MODEL,
    Replica,
    code,
    row,
)


def probe_connections(b: Replica) -> None:
    heads = [socket.create_connection(("127.0.0.1", b.port)) for _ in range(51)]
    for s in heads:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    bodies = [socket.create_connection(("127.0.0.1", b.port)) for _ in range(10)]
    for s in bodies:
        s.sendall(b'POST /v1/chunks HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{"texts"')
    time.sleep(8)  # B runs with --header-timeout 3 --body-timeout 3
    closed = 0
    for s in heads + bodies:
        s.settimeout(1)
        with contextlib.suppress(OSError):
            data = s.recv(4096)
            closed += data == b"" or b" 408 " in data
        s.close()
    row("10", "half-sent heads and bodies closed after 8 s", f"{closed}/61", closed == 61)


def probe_sigterm(b: Replica) -> None:
    got: dict[int, object] = {}

    def stream(i):
        # a prompt the model answers at length, so both streams still run when SIGTERM comes (a stream that ends
        # first frees its slot, and a queued request then runs and is answered: not the case probed)
        ask = f"Count from {i + 1} to 900, one number per line."
        body = {"model": MODEL, "messages": [{"role": "user", "content": ask}], "max_tokens": 400}
        with httpx.stream("POST", f"{b.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            got[i] = [line for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]  # B: --max-active 2
    queued = [lambda i=i: got.setdefault(10 + i, b.chat(f"Queued {i}", max_tokens=50)) for i in range(3)]
    threads += [threading.Thread(target=fn) for fn in queued]
    for th in threads:
        th.start()
        time.sleep(0.3)
    time.sleep(2)
    t = time.perf_counter()
    b.proc.send_signal(signal.SIGTERM)
    for th in threads:
        th.join()
    b.proc.wait(60)
    waits = [(s, code(d), round(secs, 1)) for s, d, _, secs in (got[10 + i] for i in range(3))]
    ok = all(s == 503 and c == "shutting_down" for s, c, _ in waits)
    row("8", "SIGTERM: queued requests (status, code, s since sent)", waits, ok)
    lasts = [e[-1] if e else "" for e in (got[0], got[1])]
    ends = [(len(e), e[-1][6:60]) if e else None for e in (got[0], got[1])]
    ok = all("[DONE]" in last or '"shutting_down"' in last for last in lasts)  # the code ends the event
    row("8", "SIGTERM: running streams end with (events, last)", ends, ok)
    exit_code = b.proc.returncode  # uvicorn re-raises the signal once it has shut down: -15
    row("8", "SIGTERM: exit (code, s)", (exit_code, round(time.perf_counter() - t, 1)), exit_code in (0, -15))


def probe_fd_flood(c: Replica) -> None:
    socks = []
    with contextlib.suppress(OSError):
        for _ in range(600):
            socks.append(socket.create_connection(("127.0.0.1", c.port), timeout=2))
    time.sleep(2)
    t = time.perf_counter()
    try:
        status = httpx.get(f"{c.url}/health", timeout=10).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    secs = time.perf_counter() - t
    for s in socks:
        s.close()
    time.sleep(1)
    after, lines = httpx.get(f"{c.url}/health", timeout=10).status_code, len(c.log_path.read_text().splitlines())
    figure, ok = (status, round(secs, 1), after, lines), status in (200, 503) and after == 200 and lines < 200
    row("10", "ulimit -n 256, 600 idle connections: /health during (s), after; log lines", figure, ok)
