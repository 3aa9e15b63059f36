"""The HTTP limits, against a real server with small settings: head size, head and body read time, idle
keep-alive, open connections, the bearer token, what /models reveals, and the SIGTERM drain.

The HTTP layer is the same whatever the engine, so these run on our own engine only.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import RunningServer, start_server

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
KEEP_ALIVE = 1.5
MAX_CONNECTIONS = 32  # above the 20 slow clients plus the request served beside them
MAX_HEADER = 4096
API_KEY = "s3cret-token"
LIMITS = {
    "SERVING_MAX_HEADER_SIZE": str(MAX_HEADER),
    "SERVING_HEADER_READ_TIMEOUT": str(HEADER_TIMEOUT),
    "SERVING_BODY_READ_TIMEOUT": str(BODY_TIMEOUT),
    "SERVING_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE),
    "SERVING_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
}


@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    server = start_server(model_dir, {"dtype": "fp32"}, tmp_path_factory.mktemp("http-limits"), "scheduler", LIMITS)
    yield server
    server.stop()


def _address(server: RunningServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection(_address(server), timeout=30)
    sock.settimeout(30)
    return sock


def _read_response(sock: socket.socket) -> tuple[int | None, bytes, float]:
    """(status or None when closed without a reply, everything read, seconds until the server closed)."""
    started = time.monotonic()
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data, time.monotonic() - started


def _body(data: bytes) -> dict:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_a_head_over_max_header_size_is_431(limited: RunningServer) -> None:
    res = requests.get(limited.url + "/ping", headers={"x-big": "a" * (MAX_HEADER + 100)}, timeout=30)
    assert res.status_code == 431
    assert f"max_header_size={MAX_HEADER}" in res.json()["message"]
    ok = requests.get(limited.url + "/ping", headers={"x-big": "a" * (MAX_HEADER // 2)}, timeout=30)
    assert ok.status_code == 200


def test_an_8_mib_header_is_refused_as_it_arrives(limited: RunningServer) -> None:
    sock = _connect(limited)

    def send() -> None:
        try:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 8 * 2**20 + b"\r\n\r\n")
        except OSError:
            pass  # the server closed the connection under us: what we want

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status, _, _ = _read_response(sock)
    assert status in (431, None)  # the 431 can be lost to the reset of a connection closed mid-upload
    sender.join(30)
    assert not sender.is_alive(), "the server kept reading an 8 MiB header"
    assert requests.get(limited.url + "/ping", timeout=30).status_code == 200


def test_a_client_trickling_its_head_is_cut_at_header_read_timeout(limited: RunningServer) -> None:
    sock = _connect(limited)
    started = time.monotonic()
    sock.sendall(b"GET /ping HTTP/1.1\r\n")
    closed: list[float] = []

    def trickle() -> None:
        try:
            while time.monotonic() - started < 20:
                sock.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            closed.append(time.monotonic() - started)

    writer = threading.Thread(target=trickle, daemon=True)
    writer.start()
    status, data, _ = _read_response(sock)
    elapsed = time.monotonic() - started
    assert status == 408 and "header_read_timeout" in _body(data)["message"]
    assert HEADER_TIMEOUT - 0.1 <= elapsed < HEADER_TIMEOUT + 5
    sock.close()


def test_twenty_slow_clients_are_all_cut_while_others_are_served(limited: RunningServer) -> None:
    socks = [_connect(limited) for _ in range(10)]
    for sock in socks:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
    more = [_connect(limited) for _ in range(10)]  # connected, never send a byte
    res = requests.post(limited.url + "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
                        timeout=60)
    assert res.status_code == 200
    outcomes = [_read_response(sock) for sock in socks + more]
    assert [status for status, _, _ in outcomes[:10]] == [408] * 10
    assert [status for status, _, _ in outcomes[10:]] == [None] * 10  # closed silently, as idle keep-alive is
    assert max(elapsed for _, _, elapsed in outcomes) < HEADER_TIMEOUT + 5


def test_an_idle_kept_alive_connection_is_closed_after_keep_alive_timeout(limited: RunningServer) -> None:
    sock = _connect(limited)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b"Healthy" not in reply:
        reply += sock.recv(65536)
    started = time.monotonic()
    assert sock.recv(65536) == b""  # blocks until the server closes the idle connection
    assert KEEP_ALIVE - 0.1 <= time.monotonic() - started < KEEP_ALIVE + 5


def test_a_body_that_does_not_arrive_in_time_is_408(limited: RunningServer) -> None:
    sock = _connect(limited)
    sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"inputs\": ")
    status, data, elapsed = _read_response(sock)
    assert status == 408 and f"body_read_timeout={BODY_TIMEOUT:g} s" in _body(data)["error"]
    assert BODY_TIMEOUT - 0.1 <= elapsed < BODY_TIMEOUT + 5


def test_connections_past_max_connections_get_503_and_the_rest_are_served(limited: RunningServer) -> None:
    held = [_connect(limited) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = _connect(limited)
        status, data, _ = _read_response(extra)
        assert status == 503 and f"max_connections={MAX_CONNECTIONS}" in _body(data)["message"]
        held[0].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # an admitted connection still works
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert requests.get(limited.url + "/ping", timeout=30).status_code == 200  # capacity is back


def test_a_malformed_request_line_is_400_in_lmi_shape(limited: RunningServer) -> None:
    sock = _connect(limited)
    sock.sendall(b"BROKEN\x00 / HTTP/1.1\r\n\r\n")
    status, data, _ = _read_response(sock)
    assert status == 400 and _body(data)["code"] == 400


def test_models_does_not_show_the_model_path(limited: RunningServer, model_dir) -> None:
    listing = requests.get(limited.url + "/models", timeout=30)
    described = requests.get(limited.url + "/models/" + listing.json()["models"][0]["modelName"], timeout=30)
    for res in (listing, described):
        assert res.status_code == 200 and str(model_dir) not in res.text
    assert listing.json()["models"][0]["modelUrl"] == ""


# ---- the bearer token and the drain, on servers of their own ---------------------------------------------------


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    server = start_server(model_dir, {"dtype": "fp32", "api_key": API_KEY, "expose_model_url": "true"},
                          tmp_path_factory.mktemp("guarded"), "scheduler")
    yield server
    server.stop()


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/invocations"), ("POST", "/v1/chat/completions"), ("GET", "/models"), ("GET", "/metrics"),
    ("POST", "/endpoints/x/invocations"), ("POST", "/predictions/x"), ("GET", "/nowhere"),
])
def test_every_route_but_ping_needs_the_bearer_token(guarded: RunningServer, method: str, path: str) -> None:
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        res = requests.request(method, guarded.url + path, json=body, headers=headers, timeout=60)
        assert res.status_code == 401, (headers, res.status_code)
        assert res.headers["www-authenticate"] == "Bearer" and res.json()["type"] == "UnauthorizedException"
        assert res.headers.get("x-request-id")
    res = requests.request(method, guarded.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                           timeout=60)
    assert res.status_code != 401
    assert requests.get(guarded.url + "/ping", timeout=30).status_code == 200


def test_expose_model_url_shows_it(guarded: RunningServer, model_dir) -> None:
    res = requests.get(guarded.url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert res.json()["models"][0]["modelUrl"] == str(model_dir)


def _stream(url: str, tokens: int, out: list) -> None:
    body = {"inputs": "Tell me a story.", "stream": True,
            "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True, "details": True}}
    try:
        with requests.post(url + "/invocations", json=body, stream=True, timeout=120) as res:
            out.append((res.status_code, [json.loads(line) for line in res.iter_lines() if line]))
    except requests.RequestException as exc:
        out.append((None, repr(exc)))


def _start_streams(server: RunningServer, count: int, tokens: int) -> tuple[list, list[threading.Thread]]:
    results: list = []
    threads = [threading.Thread(target=_stream, args=(server.url, tokens, results)) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every stream admitted before the signal
        text = requests.get(server.url + "/metrics", timeout=30).text
        running = [line for line in text.splitlines() if line.startswith("llm_running_batch_size ")]
        if running and float(running[0].split()[1]) >= count:
            break
        time.sleep(0.05)
    return results, threads


def test_sigterm_drains_every_stream_then_exits_0(model_dir, tmp_path) -> None:
    server = start_server(model_dir, {"dtype": "fp32"}, tmp_path, "scheduler", {"SERVING_GRACEFUL_SHUTDOWN_TIMEOUT": "60"})
    try:
        results, threads = _start_streams(server, 6, 40)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):  # no new connections while draining
            requests.get(server.url + "/ping", timeout=5)
        for thread in threads:
            thread.join(120)
        assert server.process.wait(60) == 0, server.log_tail()
        assert len(results) == 6
        for status, lines in results:
            assert status == 200 and isinstance(lines, list), lines
            assert lines[-1]["details"]["finish_reason"] == "length" and len(lines) == 40
    finally:
        server.stop()


def test_a_drain_cut_short_by_graceful_shutdown_timeout_exits_1(model_dir, tmp_path) -> None:
    server = start_server(model_dir, {"dtype": "fp32"}, tmp_path, "scheduler", {"SERVING_GRACEFUL_SHUTDOWN_TIMEOUT": "0.5"})
    try:
        results, threads = _start_streams(server, 2, 2000)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 1
        for thread in threads:
            thread.join(60)
        assert all(status is None or len(lines) < 2000 for status, lines in results)
        assert "graceful_shutdown_timeout" in server.log_tail()
    finally:
        server.stop()
