"""The checks of LMI's own integration client (djl-serving `tests/integration/llm/client.py`, its LMI checks
1-4 and 7), run against a real server over HTTP.

`send_json` and `response_checker` are re-implemented exactly as section 6 describes djl-serving's
`tests/integration/llm/client.py`: any status >= 300 raises, the content type is compared with exact string
equality, jsonlines lines may carry a `data: ` prefix, and an in-band error (`details.finish_reason ==
"error"` or a `code` other than 200) fails the check.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

# Sentences in the style of LMI's `batch_generation`.
SENTENCES = [
    "Memories follow me left and right. I can",
    "Amazon is the world's largest",
    "The new movie that got Oscar this year",
    "The sky is blue because",
]
SEQ_LEN = 16


# ---- LMI's client, as djl-serving's tests/integration/llm/client.py runs it ------------------------------------------------


def send_json(url: str, data: Any, timeout: float = 120) -> requests.Response:
    """`send_json`: POST /invocations with content-type application/json; any status >= 300 raises."""
    res = requests.post(
        url + "/invocations", headers={"content-type": "application/json"}, data=json.dumps(data), timeout=timeout
    )
    if res.status_code >= 300:
        raise ValueError(f"Failed to send request to model server. Status code: {res.status_code}")
    return res


def _check_in_band(output: Any) -> None:
    if isinstance(output, dict):
        if output.get("details") is not None:
            if output["details"].get("finish_reason") == "error":
                raise RuntimeError("Inference failed!")
        elif output.get("code", 200) != 200:
            raise RuntimeError("Inference failed!")


def response_checker(res: requests.Response, message: str) -> None:
    """`response_checker(res, message)`: section 6 item 2."""
    content_type = res.headers.get("content-type")
    if content_type == "application/json":
        first = message.split("\n")[0].strip()
        if not first:
            raise RuntimeError("Empty JSON response")
        try:
            output = json.loads(first)
        except json.JSONDecodeError:
            raise RuntimeError(f"Invalid JSON response: {first}") from None
        _check_in_band(output)
    elif content_type == "application/jsonlines":
        lines = []
        for item in message.split("\n"):
            item = item.strip()
            if item.startswith("data: "):
                item = item[len("data: "):]
            if not item:
                continue
            try:
                lines.append(json.loads(item))
            except json.JSONDecodeError:
                continue
        if not lines:
            raise RuntimeError("No valid JSON lines found in response")
        _check_in_band(lines[-1])
    # any other content type: the check is skipped


class FakeResponse:
    def __init__(self, content_type: str) -> None:
        self.headers = {"content-type": content_type}


@pytest.mark.parametrize(
    "content_type, message",
    [
        ("application/json", '{"error":"exception occurred during rolling batch inference","code":424}'),
        ("application/json", '{"generated_text": "", "details": {"finish_reason": "error"}}'),
        ("application/json", ""),
        ("application/json", "not json"),
        ("application/jsonlines", '{"token": {"id": 1}}\n{"error":"boom","code":424}\n'),
        ("application/jsonlines",
         'data: {"token": {"id": 1}}\ndata: {"generated_text": "", "details": {"finish_reason": "error"}}\n'),
        ("application/jsonlines", "garbage\n\n"),
    ],
)
def test_response_checker_rejects_failures(content_type: str, message: str) -> None:
    """Our checker must be able to fail, or the checks below prove nothing."""
    with pytest.raises(RuntimeError):
        response_checker(FakeResponse(content_type), message)


@pytest.mark.parametrize(
    "content_type, message",
    [
        ("application/json", '{"generated_text": "x", "details": {"finish_reason": "length"}}'),
        ("application/json", '{"generated_text": "x"}'),
        ("application/jsonlines", 'data: {"token": {"id": 1}}\ndata: {"generated_text": "x"}\n'),
        ("text/event-stream", "anything"),
    ],
)
def test_response_checker_accepts_successes(content_type: str, message: str) -> None:
    response_checker(FakeResponse(content_type), message)


def parse_jsonlines(message: str) -> list[dict[str, Any]]:
    """Strict parsing for our own assertions: every line must be JSON and the body must end with a newline."""
    assert message.endswith("\n"), f"jsonlines body does not end with a newline: {message[-80:]!r}"
    return [json.loads(line) for line in message.split("\n")[:-1]]


# ---- test_handler_rolling_batch -----------------------------------------------------------------------------


def rolling_batch_request(stream: bool, max_new_tokens: int = SEQ_LEN, prompt: str = SENTENCES[0]) -> dict[str, Any]:
    return {
        "inputs": prompt,
        "parameters": {"do_sample": True, "max_new_tokens": max_new_tokens, "details": True},
        "stream": stream,
    }


def test_handler_rolling_batch_non_stream(server) -> None:
    res = send_json(server.url, rolling_batch_request(stream=False))
    message = res.content.decode("utf-8")
    response_checker(res, message)
    assert res.headers["content-type"] == "application/json"
    out = json.loads(message)
    assert isinstance(out["generated_text"], str)
    details = out["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["inputs"] == SENTENCES[0]
    assert 1 <= details["generated_tokens"] <= SEQ_LEN
    assert len(details["tokens"]) == details["generated_tokens"]
    assert "".join(t["text"] for t in details["tokens"]) == out["generated_text"]
    if details["finish_reason"] == "length":
        assert details["generated_tokens"] == SEQ_LEN


def test_handler_rolling_batch_stream(server) -> None:
    res = send_json(server.url, rolling_batch_request(stream=True))
    message = res.content.decode("utf-8")
    response_checker(res, message)
    assert res.headers["content-type"] == "application/jsonlines"
    lines = parse_jsonlines(message)
    assert 1 <= len(lines) <= SEQ_LEN
    assert all(set(line) == {"token"} for line in lines[:-1]), lines[:-1]
    last = lines[-1]
    assert last["details"]["finish_reason"] in ("length", "eos_token")
    assert last["details"]["generated_tokens"] == len(lines)
    assert "tokens" not in last["details"]  # streaming details never carry tokens
    assert last["generated_text"] == "".join(line["token"]["text"] for line in lines)
    for line in lines:
        token = line["token"]
        assert isinstance(token["id"], int) and isinstance(token["text"], str)
        assert token["log_prob"] is None or token["log_prob"] <= 0


# ---- test_handler (LMI's dynamic-batch test, with a single string input) ------------------------------------


@pytest.mark.parametrize("max_new_tokens", [5, 12])
def test_handler_stream_line_count_within_max_new_tokens(server, max_new_tokens: int) -> None:
    req = {"inputs": SENTENCES[1], "parameters": {"max_new_tokens": max_new_tokens}, "stream": True}
    res = send_json(server.url, req)
    message = res.content.decode()
    response_checker(res, message)
    result = message.split("\n")[:-1]
    assert len(result) <= max_new_tokens, "generated more tokens than max_new_tokens"
    # with EOS ignored the count is exact, so the bound above is not met trivially
    req["parameters"]["ignore_eos_token"] = True
    res = send_json(server.url, req)
    result = res.content.decode().split("\n")[:-1]
    assert len(result) == max_new_tokens
    assert json.loads(result[-1])["generated_text"] == "".join(json.loads(r)["token"]["text"] for r in result)


def test_handler_non_stream_single_input(server) -> None:
    req = {"inputs": SENTENCES[2], "parameters": {"max_new_tokens": 8, "details": True}, "stream": False}
    res = send_json(server.url, req)
    message = res.content.decode()
    response_checker(res, message)
    out = json.loads(message)
    # LMI accepts a dict (rather than a list) only when batch_size == 1
    assert isinstance(out, dict) and isinstance(out["generated_text"], str)
    assert 1 <= out["details"]["generated_tokens"] <= 8


@pytest.mark.parametrize("stream", [False, True])
def test_handler_list_inputs_is_424(server, stream: bool) -> None:
    req = {"inputs": SENTENCES[:2], "parameters": {"max_new_tokens": 8}, "stream": stream}
    with pytest.raises(ValueError, match=r"Status code: 424"):
        send_json(server.url, req)
    res = requests.post(server.url + "/invocations", json=req, timeout=30)
    assert res.status_code == 424
    body = res.json()
    assert body["code"] == 424
    assert "'inputs'" in body["error"] and "must be a string" in body["error"], body


# ---- awscurl-like mini benchmark -----------------------------------------------------------------------------


@dataclass
class BenchResult:
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _awscurl_extract(res: requests.Response, body: str) -> tuple[str, int]:
    """awscurl's error rules: HTTP >= 300, invalid application/json, or any invalid application/jsonlines
    line is an error. Returns the text it would extract and the token count."""
    if res.status_code >= 300:
        raise ValueError(f"HTTP {res.status_code}: {body[:200]}")
    ctype = res.headers.get("content-type")
    if ctype == "application/json":
        out = json.loads(body)
        return out["generated_text"], out["details"]["generated_tokens"]
    if ctype == "application/jsonlines":
        lines = [json.loads(line) for line in body.split("\n") if line.strip()]
        text = "".join(line["token"]["text"] for line in lines if "token" in line)
        if lines[-1].get("generated_text") != text:
            raise ValueError("final generated_text does not match the streamed tokens")
        return text, len(lines)
    raise ValueError(f"unexpected content type {ctype!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_awscurl_like_concurrent_run(server, stream: bool) -> None:
    clients, per_client, seq_len = 4, 3, 8
    result = BenchResult()

    def client(i: int) -> None:
        with requests.Session() as session:
            for n in range(per_client):
                req = rolling_batch_request(stream, seq_len, SENTENCES[(i + n) % len(SENTENCES)])
                try:
                    res = session.post(server.url + "/invocations", json=req, timeout=120)
                    body = res.content.decode("utf-8")
                    response_checker(res, body)
                    _, tokens = _awscurl_extract(res, body)
                    if not 1 <= tokens <= seq_len:
                        raise ValueError(f"{tokens} tokens for max_new_tokens={seq_len}")
                except Exception as exc:  # noqa: BLE001 -- every failure counts as an awscurl error
                    with result.lock:
                        result.errors.append(f"client {i} request {n}: {type(exc).__name__}: {exc}")
                    continue
                with result.lock:
                    result.requests += 1
                    result.tokens += tokens

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    assert result.errors == []
    assert result.requests == clients * per_client
    assert result.tokens >= clients * per_client


# ---- test_tiny_llama_input_length_exceeded (item 7) ----------------------------------------------------------


@pytest.fixture
def short_context_server(servers, backend):
    return servers.get(backend, max_model_len="50", max_rolling_batch_size="1")


def long_prompt(tokenizer, n_tokens: int = 100) -> str:
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    ids = tokenizer(text)["input_ids"][:n_tokens]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer(prompt)["input_ids"]) >= 95
    return prompt


def short_prompt(tokenizer) -> str:
    prompt = "Amazon is the world's largest online store for"
    assert 8 <= len(tokenizer(prompt)["input_ids"]) <= 12
    return prompt


def test_input_length_exceeded_fails_fast_then_short_prompt_succeeds(short_context_server, tokenizer) -> None:
    url = short_context_server.url
    req = {"inputs": long_prompt(tokenizer), "parameters": {"max_new_tokens": 10}}
    started = time.monotonic()
    with pytest.raises(ValueError, match=r".*424.*"):
        send_json(url, req, timeout=20)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"over-long prompt took {elapsed:.2f} s to be refused"

    res = requests.post(url + "/invocations", json=req, timeout=20)
    assert res.status_code == 424
    assert re.match(r".*424.*", res.text)
    body = res.json()
    assert body["code"] == 424 and "max_model_len" in body["error"] and "50" in body["error"], body

    req = {"inputs": short_prompt(tokenizer), "parameters": {"max_new_tokens": 10, "details": True}}
    res = send_json(url, req, timeout=60)
    message = res.content.decode()
    response_checker(res, message)
    out = json.loads(message)
    assert 1 <= out["details"]["generated_tokens"] <= 10


def test_input_length_exceeded_is_refused_while_the_only_slot_is_busy(short_context_server, tokenizer) -> None:
    """The LMI bug this test pins was a hang: the over-long prompt must not wait for the single batch slot."""
    url = short_context_server.url
    busy = requests.post(
        url + "/invocations",
        json={"inputs": short_prompt(tokenizer), "parameters": {"max_new_tokens": 12, "ignore_eos_token": True},
              "stream": True},
        stream=True, timeout=60,
    )
    try:
        lines = busy.iter_lines()
        assert json.loads(next(lines))["token"]  # generation is under way in the only slot
        started = time.monotonic()
        res = requests.post(url + "/invocations", json={"inputs": long_prompt(tokenizer)}, timeout=20)
        elapsed = time.monotonic() - started
        assert res.status_code == 424 and re.match(r".*424.*", res.text)
        assert elapsed < 1.0, f"over-long prompt took {elapsed:.2f} s to be refused"
        rest = [json.loads(line) for line in lines if line]
    finally:
        busy.close()
    assert len(rest) == 11 and "generated_text" in rest[-1]  # the busy stream was not disturbed
    res = send_json(url, {"inputs": short_prompt(tokenizer), "parameters": {"max_new_tokens": 5}})
    response_checker(res, res.content.decode())
