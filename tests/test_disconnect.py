"""Client disconnects free the request's batch slot at once, whatever the transport, and the server goes on
serving correctly afterwards. Proof comes from the server's own gauges on GET /metrics
(`llm_running_batch_size`, `llm_queue_depth`) and from the generated-token counter stopping.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
import requests

LONG = {"max_new_tokens": 2000, "ignore_eos_token": True}
FREED_WITHIN_S = 5.0


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `predicate` held, or None if it never did within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def running(url: str) -> float:
    return metric(url, "llm_running_batch_size")


def assert_idle(url: str) -> None:
    assert wait_until(lambda: running(url) == 0 and metric(url, "llm_queue_depth") == 0, 30) is not None, \
        "server is not idle before the test"


def assert_freed_and_stopped(url: str) -> None:
    took = wait_until(lambda: running(url) == 0, FREED_WITHIN_S)
    assert took is not None, f"the slot was not freed within {FREED_WITHIN_S} s of the disconnect"
    # and it stays free: nothing re-admits the aborted request
    time.sleep(0.3)
    assert running(url) == 0 and metric(url, "llm_queue_depth") == 0


def raw_post(url: str, body: dict) -> socket.socket:
    """Send a POST /invocations on a bare socket and return it unread."""
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(
        b"POST /invocations HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (parts.netloc.encode(), len(data)) + data
    )
    return sock


REFERENCE = {"inputs": "The three primary colors are", "parameters": {"max_new_tokens": 12}}


@pytest.fixture
def reference_text(server) -> str:
    """A greedy answer taken before any disconnect, to compare with after."""
    res = requests.post(server.url + "/invocations", json=REFERENCE, timeout=60)
    assert res.status_code == 200
    return res.json()["generated_text"]


def assert_serves_correctly(url: str, reference_text: str) -> None:
    res = requests.post(url + "/invocations", json=REFERENCE, timeout=60)
    assert res.status_code == 200
    assert res.json()["generated_text"] == reference_text  # same greedy output: no state leaked from the abort


def test_streaming_disconnect_frees_the_slot(server, reference_text) -> None:
    url = server.url
    assert_idle(url)
    res = requests.post(url + "/invocations", json={"inputs": "Count slowly:", "parameters": LONG, "stream": True},
                        stream=True, timeout=60)
    lines = res.iter_lines()
    for _ in range(3):
        assert "token" in json.loads(next(lines))
    assert running(url) == 1  # the gauge sees the live request, so its going to 0 below means something
    res.close()
    assert_freed_and_stopped(url)
    assert_serves_correctly(url, reference_text)


def test_sse_chat_stream_disconnect_frees_the_slot(server, reference_text) -> None:
    url = server.url
    assert_idle(url)
    res = requests.post(url + "/v1/chat/completions", stream=True, timeout=60, json={
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        "max_tokens": 2000, "ignore_eos": True, "stream": True,
    })
    assert res.headers["content-type"] == "text/event-stream"
    events = (line for line in res.iter_lines() if line)
    for _ in range(3):
        assert next(events).startswith(b"data: ")
    assert running(url) == 1
    res.close()
    assert_freed_and_stopped(url)
    assert_serves_correctly(url, reference_text)


def test_non_streaming_disconnect_on_raw_socket_frees_the_slot(server, reference_text) -> None:
    url = server.url
    assert_idle(url)
    first_tokens = metric(url, "llm_time_to_first_token_seconds_count")
    sock = raw_post(url, {"inputs": "Count slowly:", "parameters": LONG})
    try:
        assert wait_until(lambda: running(url) == 1, 30) is not None, "the request never started"
        # generation is under way (its first token is out) before the client goes
        assert wait_until(lambda: metric(url, "llm_time_to_first_token_seconds_count") > first_tokens, 30) is not None
    finally:
        sock.close()
    assert_freed_and_stopped(url)
    assert_serves_correctly(url, reference_text)


def test_non_streaming_client_timeout_frees_the_slot(server, reference_text) -> None:
    url = server.url
    assert_idle(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/invocations", json={"inputs": "Count slowly:", "parameters": LONG}, timeout=1.5)
    assert_freed_and_stopped(url)
    assert_serves_correctly(url, reference_text)


def test_many_disconnects_in_a_row_leave_no_slot_behind(server, reference_text) -> None:
    url = server.url
    assert_idle(url)
    socks = [raw_post(url, {"inputs": f"Story number {i}:", "parameters": LONG, "stream": i % 2 == 0})
             for i in range(4)]
    try:
        assert wait_until(lambda: running(url) == 4, 60) is not None, "the four requests never ran together"
    finally:
        for sock in socks:
            sock.close()
    assert_freed_and_stopped(url)
    assert_serves_correctly(url, reference_text)


@pytest.fixture
def single_slot_server(servers, backend):
    # the same options as LMI's input-length test, so the pool can share the server
    return servers.get(backend, max_model_len="50", max_rolling_batch_size="1")


BUSY_TOKENS = 40


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_queued_leaves_the_queue(single_slot_server, stream: bool) -> None:
    """A request whose client leaves while it waits for a batch slot must leave the queue then, not hold a
    place (and `job_queue_size` capacity) until a slot frees and then run a prefill for nobody."""
    url = single_slot_server.url
    assert_idle(url)
    seen = {"lines": 0}
    busy = requests.post(url + "/invocations", stream=True, timeout=120, json={
        "inputs": "Count:", "parameters": {"max_new_tokens": BUSY_TOKENS, "ignore_eos_token": True}, "stream": True})
    lines = busy.iter_lines()
    next(lines)  # the only slot is generating
    seen["lines"] = 1

    def drain() -> None:
        try:
            for _ in lines:
                seen["lines"] += 1
        except Exception:  # noqa: BLE001 -- closed by the test below
            pass

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        sock = raw_post(url, {"inputs": "Hello there", "parameters": {"max_new_tokens": 5}, "stream": stream})
        try:
            assert wait_until(lambda: metric(url, "llm_queue_depth") == 1, 10) is not None, "the request never queued"
        finally:
            sock.close()
        closed_at = seen["lines"]
        assert wait_until(lambda: metric(url, "llm_queue_depth") == 0, 120) is not None
        left_at = seen["lines"]
        # Left the queue while the busy stream still had tokens to go, not when it ended and freed the slot.
        # OpenVINO's step() holds the GIL, so the server notices the disconnect a few tokens late there;
        # it must still be before the busy stream ends (which would have freed the slot anyway).
        margin = 1 if single_slot_server.backend == "openvino" else 5
        assert left_at <= BUSY_TOKENS - margin, (
            f"the abandoned request stayed queued until the busy stream ended (client left at busy token "
            f"{closed_at}, queue emptied at busy token {left_at} of {BUSY_TOKENS})"
        )
    finally:
        busy.close()
        drainer.join(60)
        wait_until(lambda: running(url) == 0 and metric(url, "llm_queue_depth") == 0, 60)
