"""One bad request fails alone (issue #10): a poisoned neighbour in the same batch changes nothing for the others.

For each poison, on every backend under test and over real HTTP: three healthy greedy streams run together
while the poison is fired again and again beside them. Every healthy stream must end with exactly the tokens
it produced running alone, every poison must get its own clear answer (a 424 naming the field, or, for the
poisons that are valid requests, a normal response), and afterwards the server is healthy, idle (no slot or
queue place left behind) and has answered nothing with a 5xx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from llm_endpoint.server.protocol import MAX_TOP_N_TOKENS
from tests.conftest import NO_TOP_TOKENS, RunningServer
from tests.test_bad_requests import error_message, request_counts
from tests.test_disconnect import metric, wait_until
from tests.test_lmi_integration import parse_jsonlines, response_checker

HEALTHY_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "List three colours:",
]
HEALTHY_TOKENS = 32
FIRE_INTERVAL_S = 0.05  # between one poison's shots: steady pressure without starving two CPU cores
STALL_S = 90  # a healthy stream takes seconds; this long without progress is a stall, reported with the gauges


@dataclass(frozen=True)
class Output:
    """What a greedy stream produced: compared exactly, so log-probs (float noise across batch shapes) stay out."""

    token_ids: tuple[int, ...]
    token_texts: tuple[str, ...]
    generated_text: str
    finish_reason: str
    generated_tokens: int


def _healthy_body(prompt: str) -> dict[str, Any]:
    return {"inputs": prompt, "stream": True,
            "parameters": {"max_new_tokens": HEALTHY_TOKENS, "ignore_eos_token": True, "details": True}}


def _stream_healthy(url: str, prompt: str, first_token: threading.Event | None = None) -> Output:
    with requests.post(url + "/invocations", json=_healthy_body(prompt), stream=True, timeout=STALL_S) as res:
        assert res.status_code == 200, res.text[:300]
        assert res.headers["content-type"] == "application/jsonlines"
        chunks = []
        for chunk in res.iter_content(chunk_size=None):
            chunks.append(chunk)
            if first_token is not None:
                first_token.set()
    message = b"".join(chunks).decode("utf-8")
    response_checker(res, message)  # LMI's own check: no in-band error
    lines = parse_jsonlines(message)
    tokens = [line["token"] for line in lines]
    last = lines[-1]
    return Output(
        tuple(t["id"] for t in tokens), tuple(t["text"] for t in tokens), last["generated_text"],
        last["details"]["finish_reason"], last["details"]["generated_tokens"],
    )


# ---- the poisons: each sends once and checks its own answer -------------------------------------------------


def _post(url: str, body: dict[str, Any] | bytes, timeout: float = STALL_S) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url + "/invocations", data=data, headers={"content-type": "application/json"},
                         timeout=timeout)


def _expect_424(res: requests.Response, *parts: str) -> None:
    assert res.status_code == 424, f"got {res.status_code}: {res.text[:300]}"
    message = error_message(res)  # LMI's {"error", "code": 424}
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def tiny_temperature(url: str, backend: str) -> None:
    _expect_424(_post(url, {"inputs": "Hello", "stream": True,
                            "parameters": {"do_sample": True, "temperature": 1e-45, "max_new_tokens": 8}}),
                "'parameters.temperature'", "must be 0 (greedy) or between 0.01 and 100", "got 1e-45")


def tiny_repetition_penalty(url: str, backend: str) -> None:
    _expect_424(_post(url, {"inputs": "Hello", "stream": True,
                            "parameters": {"repetition_penalty": 1e-40, "max_new_tokens": 8}}),
                "'parameters.repetition_penalty'", "must be between 0.01 and 100", "got 1e-40")


def nan_temperature(url: str, backend: str) -> None:
    raw = b'{"inputs": "Hello", "stream": true, "parameters": {"do_sample": true, "temperature": NaN}}'
    _expect_424(_post(url, raw), "'parameters.temperature'", "must be a finite number")


def disconnect_mid_stream(url: str, backend: str) -> None:
    body: dict[str, Any] = {"inputs": "Count slowly:", "stream": True,
                            "parameters": {"max_new_tokens": 2000, "ignore_eos_token": True}}
    with requests.post(url + "/invocations", json=body, stream=True, timeout=STALL_S) as res:
        assert res.status_code == 200, res.text[:300]
        lines = res.iter_lines()
        for _ in range(2):
            assert "token" in json.loads(next(lines))
    # leaving the block closes the connection with ~2000 tokens still to go


def garbage_json(url: str, backend: str) -> None:
    _expect_424(_post(url, b'{"inputs": "Hello", "parameters": {"max_new_tokens": 5,}, \x00 garbage'),
                "not valid JSON", "expected a JSON object")


def prompt_over_max_length(url: str, backend: str) -> None:
    _expect_424(_post(url, {"inputs": "hello " * 9000, "stream": True}), "Input too long", "max_model_len")


def top_n_tokens_at_max(url: str, backend: str) -> None:
    res = _post(url, {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "top_n_tokens": MAX_TOP_N_TOKENS,
                                                        "details": True}})
    if backend in NO_TOP_TOKENS:
        _expect_424(res, "'parameters.top_n_tokens'", "not supported")
        return
    assert res.status_code == 200, res.text[:300]
    details = res.json()["details"]
    assert len(details["top_tokens"]) == details["generated_tokens"] >= 1
    assert all(len(top) == MAX_TOP_N_TOKENS for top in details["top_tokens"])


def stop_sequence_never_matching(url: str, backend: str) -> None:
    res = _post(url, {"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 12, "ignore_eos_token": True, "details": True, "stop_sequences": ["\u2603never\u2603"]}})
    assert res.status_code == 200, res.text[:300]
    details = res.json()["details"]
    assert (details["finish_reason"], details["generated_tokens"]) == ("length", 12)


def huge_max_new_tokens(url: str, backend: str) -> None:
    _expect_424(_post(url, {"inputs": "Hello", "stream": True, "parameters": {"max_new_tokens": 10**12}}),
                "'parameters.max_new_tokens'", "max_model_len")


POISONS: dict[str, Callable[[str, str], None]] = {
    "temperature-1e-45": tiny_temperature,
    "repetition_penalty-1e-40": tiny_repetition_penalty,
    "temperature-NaN-literal": nan_temperature,
    "disconnect-mid-stream": disconnect_mid_stream,
    "garbage-json": garbage_json,
    "prompt-over-max-length": prompt_over_max_length,
    "top_n_tokens-at-max": top_n_tokens_at_max,
    "stop-sequence-never-matching": stop_sequence_never_matching,
    "max_new_tokens-huge": huge_max_new_tokens,
}


# ---- the test -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def solo_cache() -> dict[str, list[Output]]:
    """Each backend's solo outputs, by server URL, computed once for all poisons."""
    return {}


@pytest.fixture
def solo(server: RunningServer, solo_cache: dict[str, list[Output]]) -> list[Output]:
    if server.url not in solo_cache:
        solo_cache[server.url] = [_stream_healthy(server.url, prompt) for prompt in HEALTHY_PROMPTS]
    return solo_cache[server.url]


@dataclass
class Shots:
    """One poison thread's record: when each shot started, and the first failure of its check."""

    starts: list[float] = field(default_factory=list)
    failure: str | None = None


def _gauges(url: str) -> str:
    try:
        return (f"running {metric(url, 'llm_running_batch_size'):g}, queued {metric(url, 'llm_queue_depth'):g}, "
                f"generated tokens {metric(url, 'llm_generation_tokens_total'):g}")
    except Exception as exc:  # noqa: BLE001 -- the server may be what is stuck
        return f"/metrics failed: {type(exc).__name__}: {exc}"


def _fire(poison: Callable[[str, str], None], server: RunningServer, go: threading.Event, stop: threading.Event,
          shots: Shots) -> None:
    go.wait(STALL_S)
    while not stop.is_set():
        shots.starts.append(time.monotonic())
        try:
            poison(server.url, server.backend)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            shots.failure = shots.failure or f"{type(exc).__name__}: {exc}"
        time.sleep(FIRE_INTERVAL_S)


@pytest.mark.parametrize("poisons", [[name] for name in POISONS] + [list(POISONS)],
                         ids=list(POISONS) + ["all-at-once"])
def test_healthy_streams_are_untouched_by_a_poisoned_neighbour(
    server: RunningServer, solo: list[Output], poisons: list[str]
) -> None:
    url = server.url
    assert wait_until(lambda: metric(url, "llm_running_batch_size") == 0 and metric(url, "llm_queue_depth") == 0,
                      30) is not None, "server is not idle before the test"
    counts_before = request_counts(url)
    first_tokens = [threading.Event() for _ in HEALTHY_PROMPTS]
    outputs: list[Output | None] = [None] * len(HEALTHY_PROMPTS)
    errors: list[str | None] = [None] * len(HEALTHY_PROMPTS)
    ends = [0.0] * len(HEALTHY_PROMPTS)
    all_streaming, stop = threading.Event(), threading.Event()

    def healthy(i: int) -> None:
        try:
            outputs[i] = _stream_healthy(url, HEALTHY_PROMPTS[i], first_tokens[i])
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors[i] = f"{type(exc).__name__}: {exc}"
        finally:
            ends[i] = time.monotonic()
            first_tokens[i].set()

    streams = [threading.Thread(target=healthy, args=(i,), daemon=True) for i in range(len(HEALTHY_PROMPTS))]
    shots = {name: Shots() for name in poisons}
    firing = [threading.Thread(target=_fire, args=(POISONS[name], server, all_streaming, stop, shots[name]),
                               daemon=True) for name in poisons]
    for thread in streams + firing:
        thread.start()
    try:
        assert all(event.wait(STALL_S) for event in first_tokens), f"the healthy streams did not start ({_gauges(url)})"
        started_all = time.monotonic()
        all_streaming.set()
        deadline = started_all + STALL_S
        for thread in streams:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [prompt for prompt, thread in zip(HEALTHY_PROMPTS, streams) if thread.is_alive()]
        assert not stuck, f"healthy streams unfinished {STALL_S} s after they started: {stuck} ({_gauges(url)})"
    finally:
        stop.set()
        all_streaming.set()
        for thread in firing:
            thread.join(STALL_S)

    assert errors == [None] * len(HEALTHY_PROMPTS), errors
    for prompt, alone, together in zip(HEALTHY_PROMPTS, solo, outputs):
        assert together == alone, f"{prompt!r} changed beside {poisons}"
    for name, record in shots.items():
        assert record.failure is None, f"{name}: {record.failure}"
        # the poison really hit while every healthy stream was mid-generation
        assert any(started_all <= t < min(ends) for t in record.starts), f"{name} never fired during the streams"
    # afterwards: healthy, idle (aborted and refused requests left no slot or queue place), and no 5xx at all
    ping = requests.get(url + "/ping", timeout=10)
    assert ping.status_code == 200 and list(ping.json().values()) == [{"status": "Healthy"}], ping.text
    assert wait_until(lambda: metric(url, "llm_running_batch_size") == 0 and metric(url, "llm_queue_depth") == 0,
                      30) is not None, "a slot or queue place was left behind"
    after = request_counts(url)
    server_errors = {status: after[status] - counts_before[status] for status in after if status >= 500}
    assert not any(server_errors.values()), f"5xx answers: {server_errors}"
