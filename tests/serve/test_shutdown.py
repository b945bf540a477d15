"""SIGTERM to a real server process: requests waiting for the engine get a 503 in OpenAI's shape at once, a stream
still running after the grace period ends with an error event (and the response ends cleanly), and the process
exits. The process serves an engine whose answers end only at max_tokens, a piece every 50 ms, so a request is
running, and others are waiting, for as long as the test needs."""

from __future__ import annotations

import signal
import textwrap
import threading

import httpx

from .conftest import free_port, sse_events, start_process, stop_process, wait_for_health, wait_until

SERVER = textwrap.dedent(
    """
    import sys, time
    from cacheblend_rag import CacheBlendEngine
    from cacheblend_rag.serve import create_app
    from cacheblend_rag.serve.server import build_server

    folder, port, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    engine = CacheBlendEngine.from_pretrained(folder, device="cpu", dtype="float32", cache_dir=cache,
                                              store=["memory://?max_bytes=100MB"])
    engine.eos_token_ids = frozenset()  # no end of its own: an answer runs to max_tokens (256 pieces, 12.8 s)
    app = create_app(engine, model_name="tiny", max_active=1, max_queue=4, shutdown_grace=1.0)
    app.state.server.scheduler.batch.before_decode = lambda: time.sleep(0.05)  # a decoding step every 50 ms
    build_server(app, "127.0.0.1", port, log_level="warning").run()
    """
)


def test_sigterm_answers_the_queue_at_once_and_ends_running_streams_with_an_error_event(model_dir, tmp_path):
    port = free_port()
    proc = start_process(["-c", SERVER, str(model_dir), str(port), str(tmp_path / "cache")])
    url = f"http://127.0.0.1:{port}"
    results: dict = {}

    def running():
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on."}], "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            results["running"] = (response.status_code, sse_events(response))

    def waiting(name: str, stream: bool):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Me too."}], "stream": stream}
        results[name] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

    try:
        wait_for_health(proc, url)
        clients = [threading.Thread(target=running)]
        clients[0].start()
        wait_until(lambda: httpx.get(f"{url}/health").json()["queue"]["active"] == 1, "the stream to start")
        clients += [threading.Thread(target=waiting, args=(n, n == "streamed")) for n in ("plain", "streamed")]
        for client in clients[1:]:
            client.start()
        wait_until(lambda: httpx.get(f"{url}/health").json()["queue"]["waiting"] == 2, "two requests to queue")
        proc.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(120)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        stop_process(proc)
    output = proc.stdout.read()
    for name in ("plain", "streamed"):  # waiting: 503 in OpenAI's shape, not a plain-text 500
        response = results[name]
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "shutting_down" and response.headers["Retry-After"] == "1"
    status, events = results["running"]  # read to its end without a protocol error: it ended cleanly
    assert status == 200 and "[DONE]" not in events
    assert len(events) > 2 and all("choices" in e for e in events[:-1])
    assert events[-1]["error"]["code"] == "shutting_down" and "grace period" in events[-1]["error"]["message"]
    assert "Traceback" not in output and "Cancel" not in output, output
