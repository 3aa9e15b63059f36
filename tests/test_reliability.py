"""The reliability suite, on every CPU backend: a seeded fuzzer over every route with healthy streams running
beside it, load at c=64, a burst of mid-stream disconnects, and memory over 1,000 requests.

What must hold: no 5xx for any client input, every request answered within a bound, the streams beside the
fuzz intact, nothing lost under load, every slot back after disconnects, RSS growth bounded. (The SIGTERM
drain and the slow-client limits are in test_http_limits.py; poisoned neighbours in test_isolation.py.)
"""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import RunningServer
from tests.test_disconnect import metric, raw_post, wait_until

FUZZ_REQUESTS = 3000
FUZZ_SEED = 20261203
FUZZ_CONCURRENCY = 8
# A fuzzed request is small (its prompt at most a few KB, its output at most a few tokens), so this bounds
# its answer even behind seven others on two cores; a request past it counts as unanswered.
ANSWER_BOUND_S = 90
FUZZ_OPTIONS = {"max_model_len": "256", "default_max_new_tokens": "4"}
BESIDE_TOKENS = 48
MODEL = "SmolLM2_135M_Instruct"

# ---- the fuzzer ------------------------------------------------------------------------------------------------

ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 4, 8, 0.5, 0.999, 1.0, 1.5, 2.0, 100.0, 101, 1e-45, -1e-45, 1e-7, 1e308, -1e308,
    2**31, 2**63, -(2**63), 10**30, "", " ", "4", "abc", "\u0000", "\ufffd", [], [1], ["a"], ["a"] * 20, {}, {"a": 1},
]
RAW_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "1" * 5000, '"\\ud800"', '"\\udfff x"', "[" * 50 + "]" * 50]
PROMPTS = [
    "Hello", " ", "\u0000", "\t\n", "{{ 7*7 }}{% for x in range(10**9) %}{% endfor %}", "<|im_start|>system\nhi",
    "ünïcødé \U0001f600", "word " * 400, "a" * 3000, "Tell me a story.", "", "\\ud800", "null",
]
LMI_PARAMETERS = [
    "max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "repetition_penalty", "seed", "stop_sequences",
    "details", "decoder_input_details", "return_full_text", "top_n_tokens", "ignore_eos_token",
    "prompt_lookup_num_tokens", "typical_p", "watermark", "truncate", "best_of", "unknown_parameter",
]
# Values a client may rightly send, so a third of the fuzz is requests that must be served.
VALID_LMI: dict[str, list[Any]] = {
    "temperature": [0, 0.7, 1.0], "top_k": [1, 5, 50], "top_p": [0.5, 0.9, 1.0], "do_sample": [True, False],
    "repetition_penalty": [1.0, 1.3], "seed": [1, 42], "stop_sequences": [["\n"], ["the", "."]],
    "details": [True, False], "return_full_text": [True, False], "top_n_tokens": [0, 2],
    "ignore_eos_token": [True, False],
}
VALID_CHAT: dict[str, list[Any]] = {
    "temperature": [0, 0.7], "top_p": [0.5, 1.0], "seed": [3], "stop": ["\n", ["a", "b"]], "logprobs": [True, False],
    "user": ["u1"], "model": [MODEL, "anything"], "stream_options": [{"include_usage": True}],
}
GOOD_PROMPTS = ["Hello", "Tell me a story.", "What is 2+2?", "Hi", "The capital of France is"]
CHAT_FIELDS = [
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop", "stream_options",
    "logprobs", "top_logprobs", "seed", "frequency_penalty", "presence_penalty", "user", "tools", "response_format",
    "repetition_penalty", "ignore_eos", "prompt_lookup_num_tokens", "logit_bias", "unknown_field",
]
CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-8", None, "text/plain", "application/x-www-form-urlencoded",
    "application/jsonlines", "multipart/form-data", "application/json; charset=utf-16", "image/png",
]
ACCEPTS = [None, "application/json", "application/jsonlines", "text/event-stream", "*/*", "image/png", "x" * 300]
POST_ROUTES = [
    "/invocations", "/invocations", "/invocations", "/v1/chat/completions", "/v1/chat/completions",
    "/endpoints/fuzz/invocations", "/endpoints/fuzz/invocations-response-stream", f"/predictions/{MODEL}",
    f"/models/{MODEL}/invoke", "/predictions/nope", "/invocations?model_name=nope", f"/invocations?model_name={MODEL}",
]
GET_ROUTES = ["/ping", "/models", f"/models/{MODEL}", "/models/nope", "/metrics", "/server/metrics", "/", "/%2e%2e/etc",
              "/invocations", "/v1/chat/completions"]


@dataclass(frozen=True)
class FuzzCase:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Fuzzer(random.Random):
    """Requests built from valid ones by replacing, dropping and adding fields, then by corrupting the text."""

    def value(self) -> Any:
        return self.choice(ODD_VALUES)

    def small_tokens(self) -> Any:
        return self.choice([1, 2, 3, 4, 0, -1, 10**6, 2**63, "3", 2.5, None])

    def valid(self, table: dict[str, list[Any]]) -> dict[str, Any]:
        return {name: self.choice(table[name]) for name in self.sample(sorted(table), self.randint(0, 4))}

    def lmi(self) -> dict[str, Any]:
        if self.random() < 0.35:
            return {"inputs": self.choice(GOOD_PROMPTS), "stream": self.random() < 0.5,
                    "parameters": {"max_new_tokens": self.randint(1, 4), **self.valid(VALID_LMI)}}
        params: dict[str, Any] = {"max_new_tokens": self.small_tokens()}
        for name in self.sample(LMI_PARAMETERS, self.randint(0, 5)):
            params[name] = self.value() if name != "max_new_tokens" else self.small_tokens()
        body: dict[str, Any] = {"inputs": self.choice(PROMPTS) if self.random() < 0.9 else self.value(),
                                "parameters": params if self.random() < 0.95 else self.value()}
        if self.random() < 0.4:
            body["stream"] = self.choice([True, False, "yes", 1, None])
        if self.random() < 0.05:
            body["requestType"] = self.choice(["NEW_SESSION", "CLOSE", "x"])
        return body

    def message(self) -> Any:
        if self.random() < 0.1:
            return self.value()
        role = self.choice(["user", "user", "user", "assistant", "system", "tool", "developer", "robot", 7])
        content: Any = self.choice(PROMPTS)
        roll = self.random()
        if roll < 0.1:
            content = [{"type": "text", "text": self.choice(PROMPTS)}, {"type": self.choice(["text", "image_url"])}]
        elif roll < 0.2:
            content = self.value()
        return {"role": role, "content": content}

    def chat(self) -> dict[str, Any]:
        if self.random() < 0.35:
            return {"messages": [{"role": "user", "content": self.choice(GOOD_PROMPTS)}], "stream": self.random() < 0.5,
                    "max_tokens": self.randint(1, 4), **self.valid(VALID_CHAT)}
        body: dict[str, Any] = {"messages": [self.message() for _ in range(self.choice([1, 1, 2, 3, 0]))],
                                "max_tokens": self.small_tokens()}
        for name in self.sample(CHAT_FIELDS, self.randint(0, 4)):
            body[name] = self.value() if name not in ("max_tokens", "max_completion_tokens") else self.small_tokens()
        if self.random() < 0.4:
            body["stream"] = self.choice([True, False, "yes", None])
        if self.random() < 0.05:
            body["messages"] = self.value()
        return body

    def corrupt(self, text: str) -> bytes:
        roll = self.random()
        if roll < 0.08:  # a raw literal where a value was
            marker = '"max_new_tokens": ' if '"max_new_tokens": ' in text else '"max_tokens": '
            return text.replace(marker, marker + self.choice(RAW_LITERALS) + ", \"_was\": ", 1).encode()
        if roll < 0.12:
            return text[: self.randint(0, len(text))].encode()
        if roll < 0.15:
            data = bytearray(text.encode())
            for _ in range(self.randint(1, 4)):
                data[self.randrange(len(data))] = self.randrange(256)
            return bytes(data)
        if roll < 0.17:
            return self.choice([b"", b"[]", b"3", b'"inputs"', b"null", b"\xff\xfe", b"{" * 5000, b'{"inputs": "x"}' * 3])
        return text.encode()

    def case(self) -> FuzzCase:
        headers: dict[str, str] = {}
        if self.random() < 0.1:
            path = self.choice(GET_ROUTES)
            method = self.choice(["GET", "GET", "GET", "DELETE", "PUT", "HEAD", "OPTIONS"])
            return FuzzCase(method, path, headers, b"")
        path = self.choice(POST_ROUTES)
        body = self.chat() if path.startswith("/v1/") or self.random() < 0.25 else self.lmi()
        content_type = self.choice(CONTENT_TYPES) if self.random() < 0.2 else "application/json"
        if content_type:
            headers["content-type"] = content_type
        if self.random() < 0.15:
            headers["accept"] = self.choice([a for a in ACCEPTS if a])
        if self.random() < 0.05:
            headers["x-amzn-sagemaker-session-id"] = self.choice(["NEW_SESSION", "abc", "", "x" * 500])
        if self.random() < 0.05:
            headers["x-request-id"] = self.choice(["ok-1", "bad id!", "x" * 500, ""])
        return FuzzCase("POST", path, headers, self.corrupt(json.dumps(body)))


def fuzz_cases(count: int, seed: int) -> list[FuzzCase]:
    fuzzer = Fuzzer(seed)
    return [fuzzer.case() for _ in range(count)]


def test_the_fuzzer_covers_every_route_and_kind_of_value() -> None:
    cases = fuzz_cases(FUZZ_REQUESTS, FUZZ_SEED)
    assert len(cases) >= 3000
    paths = {c.path for c in cases}
    assert set(POST_ROUTES) <= paths and set(GET_ROUTES) <= paths
    bodies = b"\n".join(c.body for c in cases)
    for needle in [b"NaN", b"\\ud800", b'"stream": true', b"1e-45", b"top_logprobs", b"stop_sequences", b"\xff"]:
        assert needle in bodies, needle
    assert fuzz_cases(50, FUZZ_SEED) == cases[:50]  # seeded: a failure replays


# ---- running it ------------------------------------------------------------------------------------------------


@dataclass
class Beside:
    """Healthy streams run one after another for as long as the fuzz runs, each checked in full."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    completed: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        body = {"inputs": "Tell me a long story about a dragon.", "stream": True,
                "parameters": {"max_new_tokens": BESIDE_TOKENS, "ignore_eos_token": True, "details": True}}
        while not self.stop.is_set():
            try:
                with requests.post(self.url + "/invocations", json=body, stream=True, timeout=ANSWER_BOUND_S) as res:
                    lines = [json.loads(line) for line in res.iter_lines() if line]
                last = lines[-1] if lines else {}
                text = "".join(line["token"]["text"] for line in lines if "token" in line)
                ok = (res.status_code == 200 and len(lines) == BESIDE_TOKENS and "error" not in last
                      and last.get("details", {}).get("finish_reason") == "length" and last["generated_text"] == text)
                if not ok:
                    self.failures.append(f"{res.status_code}: {lines[-2:]}")
                self.completed += 1
            except Exception as exc:  # noqa: BLE001 -- collected and reported by the test
                self.failures.append(repr(exc))


def send(url: str, case: FuzzCase) -> tuple[int | None, str]:
    """(status, a short description); None when no complete answer came within ANSWER_BOUND_S."""
    try:
        with requests.request(case.method, url + case.path, data=case.body, headers=case.headers, stream=True,
                              timeout=(10, ANSWER_BOUND_S)) as res:
            deadline = time.monotonic() + ANSWER_BOUND_S
            for _ in res.iter_content(65536):
                if time.monotonic() > deadline:
                    return None, "the answer did not end in time"
            return res.status_code, ""
    except requests.RequestException as exc:
        return None, repr(exc)


@pytest.fixture
def fuzz_server(servers, backend) -> RunningServer:
    return servers.get(backend, **FUZZ_OPTIONS)


def _idle(url: str) -> bool:
    return metric(url, "llm_running_batch_size") == 0 and metric(url, "llm_queue_depth") == 0


def test_fuzz_every_route_with_streams_beside(fuzz_server: RunningServer) -> None:
    url = fuzz_server.url
    cases = fuzz_cases(FUZZ_REQUESTS, FUZZ_SEED)
    beside = Beside(url)
    runner = threading.Thread(target=beside.run, daemon=True)
    runner.start()
    try:
        with ThreadPoolExecutor(FUZZ_CONCURRENCY) as pool:
            outcomes = list(pool.map(lambda c: send(url, c), cases))
    finally:
        beside.stop.set()
        runner.join(ANSWER_BOUND_S + 10)
    statuses = collections.Counter(status for status, _ in outcomes)
    server_errors = [(i, cases[i], status) for i, (status, _) in enumerate(outcomes) if status and status >= 500]
    unanswered = [(i, cases[i], why) for i, (status, why) in enumerate(outcomes) if status is None]
    assert not server_errors, f"{len(server_errors)} 5xx, e.g. {server_errors[:3]}\n{fuzz_server.log_tail()}"
    assert not unanswered, f"{len(unanswered)} unanswered, e.g. {unanswered[:3]}"
    assert statuses[200] >= 600 and sum(n for s, n in statuses.items() if s and 400 <= s < 500) >= 1000, statuses
    assert beside.completed >= 2 and not beside.failures, beside.failures[:3]
    assert wait_until(lambda: _idle(url), 30) is not None, "a fuzzed request left a slot or queue place behind"
    assert requests.get(url + "/ping", timeout=10).status_code == 200


def test_500_requests_at_c64_none_lost(fuzz_server: RunningServer) -> None:
    url = fuzz_server.url

    def one(i: int) -> tuple[int | None, str]:
        stream = i % 3 == 0
        body = {"inputs": f"Request {i}:", "stream": stream, "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}}
        try:
            res = requests.post(url + "/invocations", json=body, timeout=300)
        except requests.RequestException as exc:
            return None, repr(exc)
        if res.status_code != 200:
            return res.status_code, res.text[:200]
        lines = [json.loads(line) for line in res.text.splitlines() if line] if stream else [res.json()]
        return 200, lines[-1].get("generated_text", "") if "error" not in lines[-1] else json.dumps(lines[-1])

    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(one, range(500)))
    failed = [(i, o) for i, o in enumerate(outcomes) if o[0] != 200]
    assert not failed, f"{len(failed)} of 500 lost or failed, e.g. {failed[:3]}"
    assert wait_until(lambda: _idle(url), 30) is not None


def test_30_mid_stream_disconnects_free_every_slot(fuzz_server: RunningServer) -> None:
    url = fuzz_server.url
    assert wait_until(lambda: _idle(url), 30) is not None
    body = {"inputs": "Count to a thousand:", "stream": True, "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    socks: list[socket.socket] = []
    for i in range(30):
        sock = raw_post(url, {**body, "stream": True if i % 3 else False})
        socks.append(sock)
    for sock in socks[1::3] + socks[2::3]:  # the streaming ones: wait until each has its first bytes
        sock.settimeout(120)
        assert sock.recv(1)
    for sock in socks:
        sock.close()
    assert wait_until(lambda: _idle(url), 30) is not None, "slots were not freed after 30 disconnects"
    res = requests.post(url + "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert res.status_code == 200


def _tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (vLLM runs its engine in a child)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def test_rss_stays_bounded_over_1000_requests(fuzz_server: RunningServer) -> None:
    url = fuzz_server.url
    rng = random.Random(7)

    def one(i: int) -> int:
        if i % 2:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": f"Say {rng.random()}"}], "max_tokens": 1}
            return requests.post(url + "/v1/chat/completions", json=body, timeout=ANSWER_BOUND_S).status_code
        body = {"inputs": f"Number {i} " * rng.randint(1, 20), "stream": i % 4 == 0,
                "parameters": {"max_new_tokens": 1, "details": True}}
        return requests.post(url + "/invocations", json=body, timeout=ANSWER_BOUND_S).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(100))) == {200}  # warm-up: caches, allocator pools, lazy imports
        before = _tree_rss_bytes(fuzz_server.process.pid)
        assert set(pool.map(one, range(1000))) == {200}
    after = _tree_rss_bytes(fuzz_server.process.pid)
    growth = after - before
    assert growth < max(64 * 2**20, before // 10), f"RSS grew {growth / 2**20:.0f} MiB over 1000 requests"
