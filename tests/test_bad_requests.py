"""Bad requests: each kind gets its documented status and a message naming the offending field and what is
expected; none yields a 500; the server stays healthy; a stream running alongside the whole table completes
intact.

Statuses follow LMI (djl-serving's error handling): payload problems are 424 with `{"error": str, "code": 424}`;
an oversized body is 413 with the same shape; unknown models and routes are 404, a wrong method 405, and a
full queue 503, with LMI's Java-side `{"code", "type", "message"}`.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.conftest import RunningServer, start_server

CHAT = [{"role": "user", "content": "hi"}]
SMALL_REQUEST_LIMIT = 4096  # bytes, for the 413 checks (the config's minimum is 1024)

# Case fields: body (bytes are sent verbatim, anything else as JSON), status, substrings of the message
# (case-sensitive), and optionally method, path, headers.


@dataclass
class Case:
    body: Any
    status: int
    expect: tuple[str, ...]
    method: str = "POST"
    path: str = "/invocations"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})

    def encoded(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def lmi(**parameters: Any) -> dict[str, Any]:
    return {"inputs": "hi", "parameters": parameters}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": CHAT, "max_tokens": 5, **fields}


INVALID = "Invalid request payload"
TEMPERATURE_RANGE = "must be 0 (greedy) or between 0.01 and 100"
PENALTY_RANGE = "must be between 0.01 and 100"
CASES: dict[str, Case] = {
    # ---- the body as a whole
    "malformed-json": Case(b'{"inputs": "hi",}', 424, ("not valid JSON", "expected a JSON object")),
    "truncated-json": Case(b'{"inputs": "hi", "parameters": {"max_new', 424, ("not valid JSON", "expected a JSON object")),
    "non-utf8-bytes": Case(b'{"inputs": "caf\xe9"}', 424, ("not valid UTF-8", "expected a UTF-8 JSON object")),
    "utf16-body": Case('{"inputs": "hi"}'.encode("utf-16"), 424, ("not valid UTF-8",)),
    "top-level-array": Case([{"inputs": "hi"}], 424, ("expected a JSON object",)),
    "top-level-string": Case("hi", 424, ("expected a JSON object",)),
    "top-level-number": Case(5, 424, ("expected a JSON object",)),
    "top-level-null": Case(None, 424, ("expected a JSON object",)),
    "top-level-true": Case(True, 424, ("expected a JSON object",)),
    "deep-nesting-100000-arrays": Case(b"[" * 100_000 + b"]" * 100_000, 424, ("nests too deeply",)),
    "deep-nesting-unclosed": Case(b'{"inputs": "hi", "parameters": ' + b"[" * 100_000, 424, ("nests too deeply",)),
    "deep-nesting-objects": Case(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 424, ("nests too deeply",)),
    "huge-integer-literal": Case(b'{"inputs": "hi", "parameters": {"max_new_tokens": 1' + b"0" * 5000 + b"}}", 424,
                                 ("integer",)),
    "content-type-text-plain": Case({"inputs": "hi"}, 424, ("text/plain", "expected application/json"),
                                    headers={"content-type": "text/plain"}),
    "content-type-xml": Case({"inputs": "hi"}, 424, ("application/xml", "expected application/json"),
                             headers={"content-type": "application/xml"}),
    "empty-body": Case(b"", 424, ("'inputs'", "non-empty string")),
    # ---- inputs
    "missing-inputs": Case({"parameters": {"max_new_tokens": 5}}, 424, ("'inputs'", "required")),
    "inputs-int": Case({"inputs": 5}, 424, ("'inputs'", "must be a string", "int")),
    "inputs-list": Case({"inputs": ["a", "b"]}, 424, ("'inputs'", "must be a string", "list")),
    "inputs-object": Case({"inputs": {"text": "hi"}}, 424, ("'inputs'", "must be a string", "dict")),
    "inputs-null": Case({"inputs": None}, 424, ("'inputs'", "must be a string")),
    "inputs-empty": Case({"inputs": ""}, 424, ("'inputs'", "non-empty string")),
    "inputs-lone-surrogate": Case(b'{"inputs": "hi \\ud800 there"}', 424, ("inputs",)),
    "prompt-over-max-model-len": Case({"inputs": "hello " * 9000}, 424, ("Input too long", "max_model_len")),
    # ---- parameters
    "parameters-list": Case({"inputs": "hi", "parameters": [1]}, 424, ("'parameters'", "JSON object")),
    "parameters-string": Case({"inputs": "hi", "parameters": "max_new_tokens=5"}, 424, ("'parameters'", "JSON object")),
    "max_new_tokens-string": Case(lmi(max_new_tokens="ten"), 424, ("parameters.max_new_tokens", "integer", "'ten'")),
    "max_new_tokens-float": Case(lmi(max_new_tokens=1.5), 424, ("parameters.max_new_tokens", "integer", "1.5")),
    "max_new_tokens-bool": Case(lmi(max_new_tokens=True), 424, ("parameters.max_new_tokens", "integer")),
    "max_new_tokens-zero": Case(lmi(max_new_tokens=0), 424, ("parameters.max_new_tokens", "greater than or equal to 1")),
    "max_new_tokens-negative": Case(lmi(max_new_tokens=-1), 424, ("parameters.max_new_tokens", "greater than or equal to 1")),
    "max_new_tokens-over-max-model-len": Case(lmi(max_new_tokens=10**12), 424,
                                              ("parameters.max_new_tokens", "max_model_len", "expected at most")),
    "temperature-string": Case(lmi(temperature="hot"), 424, ("parameters.temperature", "number", "'hot'")),
    "temperature-negative": Case(lmi(temperature=-1), 424, ("parameters.temperature", TEMPERATURE_RANGE, "got -1")),
    "temperature-huge": Case(lmi(temperature=1e9), 424, ("parameters.temperature", TEMPERATURE_RANGE)),
    "temperature-below-floor": Case(lmi(temperature=1e-45, do_sample=True), 424,
                                    ("parameters.temperature", TEMPERATURE_RANGE, "got 1e-45")),
    "temperature-just-below-floor": Case(lmi(temperature=0.009), 424, ("parameters.temperature", TEMPERATURE_RANGE)),
    "temperature-nan": Case(b'{"inputs": "hi", "parameters": {"temperature": NaN}}', 424,
                            ("parameters.temperature", "finite number", "got nan")),
    "temperature-infinity": Case(b'{"inputs": "hi", "parameters": {"temperature": Infinity}}', 424,
                                 ("parameters.temperature", "finite number", "got inf")),
    "temperature-overflowing-literal": Case(b'{"inputs": "hi", "parameters": {"temperature": 1e999}}', 424,
                                            ("parameters.temperature", "finite number")),
    "top_p-zero": Case(lmi(top_p=0), 424, ("parameters.top_p", "greater than 0")),
    "top_p-above-one": Case(lmi(top_p=1.5), 424, ("parameters.top_p", "less than or equal to 1")),
    "top_p-nan": Case(b'{"inputs": "hi", "parameters": {"top_p": NaN}}', 424, ("parameters.top_p", "finite number")),
    "top_k-negative": Case(lmi(top_k=-5), 424, ("parameters.top_k", "greater than or equal to -1")),
    "top_k-string": Case(lmi(top_k="x"), 424, ("parameters.top_k", "integer")),
    "repetition_penalty-zero": Case(lmi(repetition_penalty=0), 424, ("parameters.repetition_penalty", PENALTY_RANGE)),
    "repetition_penalty-negative": Case(lmi(repetition_penalty=-1), 424, ("parameters.repetition_penalty", PENALTY_RANGE)),
    "repetition_penalty-below-floor": Case(lmi(repetition_penalty=1e-40), 424,
                                           ("parameters.repetition_penalty", PENALTY_RANGE, "got 1e-40")),
    "repetition_penalty-huge": Case(lmi(repetition_penalty=101), 424, ("parameters.repetition_penalty", PENALTY_RANGE)),
    "repetition_penalty-minus-infinity": Case(b'{"inputs": "hi", "parameters": {"repetition_penalty": -Infinity}}',
                                              424, ("parameters.repetition_penalty", "finite number", "got -inf")),
    "seed-negative": Case(lmi(seed=-1), 424, ("parameters.seed", "greater than or equal to 0")),
    "seed-2**64": Case(lmi(seed=2**64), 424, ("parameters.seed", "less than or equal to")),
    "seed-string": Case(lmi(seed="x"), 424, ("parameters.seed", "integer")),
    "do_sample-string": Case(lmi(do_sample="yes"), 424, ("parameters.do_sample", "boolean", "'yes'")),
    "details-int": Case(lmi(details=1), 424, ("parameters.details", "boolean")),
    "return_full_text-string": Case(lmi(return_full_text="yes"), 424, ("parameters.return_full_text", "boolean")),
    "ignore_eos_token-int": Case(lmi(ignore_eos_token=1), 424, ("parameters.ignore_eos_token", "boolean")),
    "stop_sequences-int": Case(lmi(stop_sequences=5), 424, ("parameters.stop_sequences",)),
    "stop_sequences-list-of-int": Case(lmi(stop_sequences=[1]), 424, ("parameters.stop_sequences", "string")),
    "stop_sequences-17": Case(lmi(stop_sequences=[f"s{i}" for i in range(17)]), 424,
                              ("parameters.stop_sequences", "17 entries", "at most 16")),
    "stop_sequences-empty-entry": Case(lmi(stop_sequences=["x", ""]), 424, ("parameters.stop_sequences", "non-empty")),
    "stop_sequences-too-long": Case(lmi(stop_sequences=["y" * 600]), 424, ("parameters.stop_sequences", "at most 512")),
    "top_n_tokens-21": Case(lmi(top_n_tokens=21), 424, ("parameters.top_n_tokens", "less than or equal to 20")),
    "top_n_tokens-negative": Case(lmi(top_n_tokens=-1), 424, ("parameters.top_n_tokens", "greater than or equal to 0")),
    "decoder_input_details-with-stream": Case({"inputs": "hi", "parameters": {"decoder_input_details": True},
                                               "stream": True}, 424, ("decoder_input_details", "streaming")),
    "stream-string": Case({"inputs": "hi", "stream": "true"}, 424, ("'stream'", "boolean")),
    # ---- chat
    "chat-messages-empty": Case({"messages": []}, 424, ("'messages'", "at least 1")),
    "chat-messages-not-list": Case({"messages": "hi"}, 424, ("'messages'", "list")),
    "chat-messages-null": Case({"messages": None}, 424, ("'messages'", "list")),
    "chat-message-without-role": Case({"messages": [{"content": "hi"}]}, 424, ("messages.0.role", "required")),
    "chat-message-bad-role": Case({"messages": [{"role": "king", "content": "hi"}]}, 424,
                                  ("messages.0.role", "'user'", "'king'")),
    "chat-content-int": Case({"messages": [{"role": "user", "content": 5}]}, 424, ("messages.0.content", "string")),
    "chat-content-image-part": Case({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}, 424, ("messages.0.content",)),
    "chat-content-lone-surrogate": Case(b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 424,
                                        ("content",)),
    "chat-n-17": Case(chat(n=17), 424, ("'n'", "must be between 1 and 16", "got 17")),
    "chat-temperature-3": Case(chat(temperature=3), 424, ("'temperature'", "must be 0 (greedy) or between 0.01 and 2")),
    "chat-temperature-below-floor": Case(chat(temperature=1e-45), 424,
                                         ("'temperature'", "must be 0 (greedy) or between 0.01 and 2", "got 1e-45")),
    "chat-temperature-nan": Case(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 424,
                                 ("'temperature'", "finite number")),
    "chat-top_p-infinity": Case(b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 424,
                                ("'top_p'", "finite number")),
    "chat-frequency_penalty-nan": Case(b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": NaN}',
                                       424, ("'frequency_penalty'", "finite number")),
    "chat-repetition_penalty-below-floor": Case(chat(repetition_penalty=1e-40), 424,
                                                ("'repetition_penalty'", PENALTY_RANGE)),
    "chat-top_logprobs-50": Case(chat(logprobs=True, top_logprobs=50), 424, ("'top_logprobs'", "less than or equal to 20")),
    "chat-logprobs-string": Case(chat(logprobs="yes"), 424, ("'logprobs'", "boolean")),
    "chat-frequency_penalty-2.5": Case(chat(frequency_penalty=2.5), 424, ("'frequency_penalty'", "less than or equal to 2")),
    "chat-presence_penalty--3": Case(chat(presence_penalty=-3), 424, ("'presence_penalty'", "greater than or equal to -2")),
    "chat-presence_penalty-string": Case(chat(presence_penalty="high"), 424, ("'presence_penalty'", "number")),
    "lmi-frequency_penalty-3": Case(lmi(frequency_penalty=3), 424,
                                    ("parameters.frequency_penalty", "less than or equal to 2")),
    "completion-frequency_penalty--2.5": Case({"prompt": "hi", "frequency_penalty": -2.5}, 424,
                                              ("'frequency_penalty'", "greater than or equal to -2")),
    "chat-max_tokens-zero": Case(chat(max_tokens=0), 424, ("'max_tokens'", "greater than or equal to 1")),
    "chat-max_tokens-over-max-model-len": Case(chat(max_tokens=10**9), 424, ("max_tokens", "max_model_len")),
    "chat-stop-17": Case(chat(stop=[f"s{i}" for i in range(17)]), 424, ("'stop'", "at most 16")),
    "chat-stream_options-bad": Case(chat(stream=True, stream_options={"include_usage": "yes"}), 424,
                                    ("stream_options.include_usage", "boolean")),
    "chat-route-bad-body": Case({"messages": []}, 424, ("'messages'",), path="/v1/chat/completions"),
    # ---- routes, models, methods
    "unknown-model-query": Case({"inputs": "hi"}, 404, ("Model not found: other",), path="/invocations?model_name=other"),
    "unknown-model-header": Case({"inputs": "hi"}, 404, ("Model not found: other",),
                                 headers={"content-type": "application/json", "model_name": "other"}),
    "unknown-model-predictions": Case({"inputs": "hi"}, 404, ("Model not found: other",), path="/predictions/other"),
    "unknown-model-invoke": Case({"inputs": "hi"}, 404, ("Model not found: other",), path="/models/other/invoke"),
    "unknown-model-describe": Case(b"", 404, ("Model not found: other",), method="GET", path="/models/other"),
    "unknown-route": Case({"inputs": "hi"}, 404, ("Not Found",), path="/v2/generate"),
    "get-invocations": Case(b"", 405, ("Method Not Allowed",), method="GET"),
    "delete-chat-completions": Case(b"", 405, ("Method Not Allowed",), method="DELETE", path="/v1/chat/completions"),
    "put-ping": Case(b"", 405, ("Method Not Allowed",), method="PUT", path="/ping"),
}

# What each status's body looks like (as djl-serving answers).
ERROR_TYPES = {
    404: {"ModelNotFoundException", "ResourceNotFoundException"},
    405: {"BadRequestException", "MethodNotAllowedException"},
    503: {"WlmCapacityException"},
}


def send(url: str, case: Case, request_id: str | None = None) -> requests.Response:
    headers = dict(case.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return requests.request(case.method, url + case.path, data=case.encoded(), headers=headers, timeout=30)


def request_counts(url: str) -> collections.Counter:
    """`llm_requests_total` by status, leaving out /metrics and /ping's own 200/503 (which tests poll)."""
    counts: collections.Counter = collections.Counter()
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'llm_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)', line)
        if m and m.group(1) != "/metrics" and not (m.group(1) == "/ping" and m.group(2) in ("200", "503")):
            counts[int(m.group(2))] += int(float(m.group(3)))
    return counts


def error_message(res: requests.Response) -> str:
    """The message of an LMI-shaped error body, after checking its shape."""
    body = res.json()
    assert isinstance(body, dict), body
    if res.status_code in ERROR_TYPES:
        assert set(body) == {"code", "type", "message"}, body
        assert body["code"] == res.status_code and body["type"] in ERROR_TYPES[res.status_code], body
        return body["message"]
    assert set(body) == {"error", "code"}, body
    assert body["code"] == res.status_code and isinstance(body["error"], str), body
    return body["error"]


# ---- the stream that runs alongside the table -----------------------------------------------------------------

ALONGSIDE_TOKENS = 400  # long enough to span the table even where engine steps hold the GIL (OpenVINO)


@dataclass
class Alongside:
    lines: list[str] = field(default_factory=list)
    status: int | None = None
    content_type: str | None = None
    error: BaseException | None = None
    started: float = 0.0
    ended: float = 0.0
    thread: threading.Thread | None = None
    table_times: list[float] = field(default_factory=list)
    table_cases: list[str] = field(default_factory=list)
    counts_before: collections.Counter = field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def alongside(servers, backend) -> Iterator[Alongside]:
    server = servers.get(backend)  # the same server the `server` fixture gives the table
    state = Alongside(counts_before=request_counts(server.url))
    first_line = threading.Event()

    def run() -> None:
        try:
            with requests.post(
                server.url + "/invocations",
                json={"inputs": "Tell me a long story about a dragon.",
                      "parameters": {"max_new_tokens": ALONGSIDE_TOKENS, "ignore_eos_token": True, "details": True},
                      "stream": True},
                stream=True, timeout=300,
            ) as res:
                state.status, state.content_type = res.status_code, res.headers.get("content-type")
                for line in res.iter_lines(decode_unicode=True):
                    if not state.lines:
                        state.started = time.monotonic()
                        first_line.set()
                    state.lines.append(line)
        except BaseException as exc:  # noqa: BLE001 -- reported by the final check
            state.error = exc
        finally:
            state.ended = time.monotonic()
            first_line.set()

    state.thread = threading.Thread(target=run, name="alongside-stream", daemon=True)
    state.thread.start()
    assert first_line.wait(120), "the alongside stream did not start"
    yield state
    state.thread.join(300)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request(server, alongside: Alongside, name: str) -> None:
    case = CASES[name]
    request_id = f"bad-{len(alongside.table_times)}"
    res = send(server.url, case, request_id)
    alongside.table_times.append(time.monotonic())
    alongside.table_cases.append(name)
    assert res.status_code == case.status, f"{name}: got {res.status_code} {res.text[:300]}"
    assert res.headers["content-type"] == "application/json"
    assert res.headers.get("x-request-id") == request_id  # every response carries LMI's headers
    assert res.headers.get("cache-control") == "no-cache; no-store, must-revalidate, private"
    message = error_message(res)
    for part in case.expect:
        assert part in message, f"{name}: {part!r} not in {message!r}"


def test_table_has_at_least_30_kinds() -> None:
    assert len(CASES) >= 30
    assert len({c.encoded() + c.path.encode() + c.method.encode() + json.dumps(c.headers).encode()
                for c in CASES.values()}) == len(CASES)


def test_stream_alongside_the_table_completed_intact(server, alongside: Alongside) -> None:
    alongside.thread.join(300)
    assert alongside.error is None, repr(alongside.error)
    assert alongside.status == 200 and alongside.content_type == "application/jsonlines"
    lines = [json.loads(line) for line in alongside.lines]
    assert len(lines) == ALONGSIDE_TOKENS
    assert all(set(line) == {"token"} for line in lines[:-1])
    last = lines[-1]
    assert last["generated_text"] == "".join(line["token"]["text"] for line in lines)
    assert last["details"]["finish_reason"] == "length"
    assert last["details"]["generated_tokens"] == ALONGSIDE_TOKENS
    # the table really ran while the stream was in flight
    during = [t for t in alongside.table_times if alongside.started < t < alongside.ended]
    assert alongside.table_times and len(during) >= len(alongside.table_times) // 2, (
        len(during), len(alongside.table_times))
    # the request counter saw exactly the table (plus the stream's 200): every status as documented, no 5xx
    after = request_counts(server.url)
    delta = {status: after[status] - alongside.counts_before[status] for status in after}
    delta = {status: n for status, n in delta.items() if n and status != 200}
    expected = dict(collections.Counter(CASES[name].status for name in alongside.table_cases))
    assert delta == expected, "llm_requests_total does not match the statuses the table saw"
    # and the server is healthy and serves a normal request afterwards
    ping = requests.get(server.url + "/ping", timeout=10)
    assert ping.status_code == 200 and list(ping.json().values()) == [{"status": "Healthy"}]
    res = requests.post(server.url + "/invocations", json=lmi(max_new_tokens=4, ignore_eos_token=True), timeout=60)
    assert res.status_code == 200 and isinstance(res.json()["generated_text"], str)


# ---- 413 and 503: a server with a small body limit and a one-deep queue ---------------------------------------


@pytest.fixture(scope="module")
def limited_server(model_dir, backend, tmp_path_factory) -> Iterator[RunningServer]:
    # compile_decode: our engine runs its default bf16 here, which would compile (~2 min) for nothing
    server = start_server(
        model_dir, {"max_rolling_batch_size": "1", "compile_decode": "false"}, tmp_path_factory.mktemp("limited-server"),
        backend,
        {"SERVING_MAX_REQUEST_SIZE": str(SMALL_REQUEST_LIMIT), "SERVING_JOB_QUEUE_SIZE": "1"},
    )
    yield server
    server.stop()


def test_oversized_body_with_content_length_is_413(limited_server) -> None:
    body = json.dumps({"inputs": "x" * (SMALL_REQUEST_LIMIT + 100)}).encode()
    res = requests.post(limited_server.url + "/invocations", data=body,
                        headers={"content-type": "application/json"}, timeout=30)
    assert res.status_code == 413
    message = error_message(res)
    assert "max_request_size" in message and str(SMALL_REQUEST_LIMIT) in message, message


def test_oversized_chunked_body_is_413(limited_server) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: requests sends Transfer-Encoding: chunked
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    res = requests.post(limited_server.url + "/invocations", data=chunks(),
                        headers={"content-type": "application/json"}, timeout=30)
    assert res.status_code == 413
    message = error_message(res)
    assert "max_request_size" in message and str(SMALL_REQUEST_LIMIT) in message, message


def test_body_just_under_the_limit_is_served(limited_server) -> None:
    body = {"inputs": "Hello " + "x" * 200, "parameters": {"max_new_tokens": 2}, "padding": "p" * 3500}
    encoded = json.dumps(body).encode()
    assert SMALL_REQUEST_LIMIT - 400 < len(encoded) <= SMALL_REQUEST_LIMIT
    res = requests.post(limited_server.url + "/invocations", data=encoded,
                        headers={"content-type": "application/json"}, timeout=60)
    assert res.status_code == 200, res.text


def _gauge(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_queue_full_is_503_and_the_queue_drains(limited_server) -> None:
    url = limited_server.url
    busy = requests.post(url + "/invocations", json={"inputs": "Count to a thousand:", "stream": True,
                                                    "parameters": {"max_new_tokens": 2000, "ignore_eos_token": True}},
                         stream=True, timeout=120)
    waiting_result: dict[str, Any] = {}

    def waiting_request() -> None:
        res = requests.post(url + "/invocations", json=lmi(max_new_tokens=3, ignore_eos_token=True), timeout=120)
        waiting_result["status"], waiting_result["body"] = res.status_code, res.text

    waiter = threading.Thread(target=waiting_request, daemon=True)
    try:
        assert busy.status_code == 200
        lines = busy.iter_lines()
        next(lines)  # the only slot is generating
        waiter.start()
        assert _wait_for(lambda: _gauge(url, "llm_queue_depth") == 1), "the second request never queued"
        res = requests.post(url + "/invocations", json=lmi(max_new_tokens=3), timeout=30)
        assert res.status_code == 503, res.text
        message = error_message(res)
        assert message.startswith("Worker queue capacity exceeded for model: "), message
    finally:
        busy.close()  # frees the slot
    waiter.join(120)
    assert waiting_result.get("status") == 200, waiting_result
    assert isinstance(json.loads(waiting_result["body"])["generated_text"], str)
    ping = requests.get(url + "/ping", timeout=10)
    assert ping.status_code == 200
