"""Stateful sessions over HTTP and boto3, on every backend: a session's turns give the stateless output for
the full history, only a turn's new tokens are prefilled on our engine, the session headers and boto3
fields, expiry, the error cases, one turn at a time; and attention sinks lifting the length limits."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import botocore.exceptions
import pytest
import requests

from llm_endpoint.backends.errors import BackendUnavailable
from llm_endpoint.backends.registry import create_backend
from tests.conftest import RunningServer, ServerPool, make_config
from tests.test_sagemaker_runtime import ENDPOINT, sagemaker_runtime

SESSION = "X-Amzn-SageMaker-Session-Id"
SESSIONS_ON = {"enable_stateful_sessions": "true"}
LMI_TURNS = ["The capital of France is", " And the capital of Italy is", " Finally, the capital of Spain is"]
CHAT_TURNS = ["Hi! Name one colour.", "Now name a fruit.", "Thanks. What is 2+2?"]
# Our engine reuses the session's KV in fp32: equal to recomputing up to summation order. vLLM's and
# OpenVINO's log-probs are held to 2e-3 of transformers' (their conformance tests); a cached and an uncached
# run may sit on either side of it.
LOGPROB_TOLERANCE = {"scheduler": 1e-4, "disable": 1e-4}
OTHER_ENGINES_TOLERANCE = 4e-3


@pytest.fixture
def session_server(servers: ServerPool, backend: str) -> RunningServer:
    return servers.get(backend, **SESSIONS_ON)


def _new_session(url: str) -> str:
    res = requests.post(url + "/invocations", json={"requestType": "NEW_SESSION"}, timeout=30)
    assert res.status_code == 200, res.text
    value = res.headers[SESSION]
    assert res.headers["X-Amzn-SageMaker-New-Session-Id"] == value
    session_id, expires = (part.strip() for part in value.split(";"))
    assert expires.startswith("Expires=") and expires.endswith("Z")
    assert res.text == f"Session {session_id} created"
    return session_id


def _lmi(url: str, inputs: str, session: str | None = None, **parameters: Any) -> dict[str, Any]:
    headers = {SESSION: session} if session else {}
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 10, "details": True, **parameters}}
    res = requests.post(url + "/invocations", json=body, headers=headers, timeout=300)
    assert res.status_code == 200, res.text
    return res.json()


def _chat_body(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": True}


def _chat_output(body: dict[str, Any]) -> tuple[str, list[int], list[float]]:
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    return choice["message"]["content"], [c["token"] for c in content], [c["logprob"] for c in content]


def _tolerance(backend: str) -> float:
    return LOGPROB_TOLERANCE.get(backend, OTHER_ENGINES_TOLERANCE)


def test_lmi_session_turns_equal_stateless_requests_with_the_whole_history(
    session_server: RunningServer, backend: str
) -> None:
    url = session_server.url
    session = _new_session(url)
    history = ""
    for turn in LMI_TURNS:
        ours = _lmi(url, turn, session)
        stateless = _lmi(url, history + turn)
        assert ours["generated_text"] == stateless["generated_text"]
        ours_tokens, their_tokens = ours["details"]["tokens"], stateless["details"]["tokens"]
        assert [t["id"] for t in ours_tokens] == [t["id"] for t in their_tokens]
        for a, b in zip(ours_tokens, their_tokens):
            assert a["log_prob"] == pytest.approx(b["log_prob"], abs=_tolerance(backend))
        history += turn + ours["generated_text"]


def test_chat_session_turns_over_boto3_equal_stateless_requests(session_server: RunningServer, backend: str) -> None:
    smr = sagemaker_runtime(session_server.url)
    created = smr.invoke_endpoint(EndpointName=ENDPOINT, SessionId="NEW_SESSION", ContentType="application/json",
                                  Body=json.dumps({"requestType": "NEW_SESSION"}))
    session = created["NewSessionId"].split(";")[0]
    history: list[dict[str, str]] = []
    for turn in CHAT_TURNS:
        message = {"role": "user", "content": turn}
        ours = smr.invoke_endpoint(EndpointName=ENDPOINT, SessionId=session, ContentType="application/json",
                                   Body=json.dumps(_chat_body([message])))
        text, tokens, logprobs = _chat_output(json.loads(ours["Body"].read()))
        stateless = requests.post(session_server.url + "/v1/chat/completions", json=_chat_body(history + [message]),
                                  timeout=300)
        their_text, their_tokens, their_logprobs = _chat_output(stateless.json())
        assert (text, tokens) == (their_text, their_tokens)
        assert logprobs == pytest.approx(their_logprobs, abs=_tolerance(backend))
        history += [message, {"role": "assistant", "content": text}]
    closed = smr.invoke_endpoint(EndpointName=ENDPOINT, SessionId=session, ContentType="application/json",
                                 Body=json.dumps({"requestType": "CLOSE"}))
    assert closed["ClosedSessionId"] == session
    with pytest.raises(smr.exceptions.ValidationError, match="is closed"):
        smr.invoke_endpoint(EndpointName=ENDPOINT, SessionId=session, Body=json.dumps(_chat_body(history)))


def _metric(url: str, name: str, labels: str = "") -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}{labels}")


def _session_tokens(url: str) -> tuple[float, float]:
    def one(source: str) -> float:
        return _metric(url, "llm_session_prompt_tokens_total", f'{{source="{source}"}}')

    return one("cache"), one("computed")


def test_a_later_turn_prefills_only_its_new_tokens_on_our_engine(servers: ServerPool, tokenizer: Any) -> None:
    url = servers.get("scheduler", **SESSIONS_ON).url
    session = _new_session(url)
    first = _lmi(url, LMI_TURNS[0], session)
    cached, computed = _session_tokens(url)
    history = LMI_TURNS[0] + first["generated_text"]
    _lmi(url, LMI_TURNS[1], session)
    cached_now, computed_now = _session_tokens(url)
    whole = len(tokenizer(history + LMI_TURNS[1])["input_ids"])
    new = whole - len(tokenizer(history)["input_ids"])
    # the new input, plus turn 1's last token (sampled, never fed through the model)
    assert computed_now - computed == new + 1
    assert cached_now - cached == whole - new - 1
    assert _metric(url, "llm_sessions_open") >= 1
    assert _metric(url, "llm_session_kv_cache_bytes") > 0


def test_session_errors_name_what_is_wrong(servers: ServerPool) -> None:
    url = servers.get("scheduler", **SESSIONS_ON).url
    smr = sagemaker_runtime(url)

    def refused(headers: dict[str, str], body: dict[str, Any], *words: str, status: int = 400) -> None:
        res = requests.post(url + "/invocations", json=body, headers=headers, timeout=30)
        assert res.status_code == status, res.text
        assert res.json()["code"] == status
        for word in words:
            assert word in res.json()["error"], res.json()

    prompt = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    refused({SESSION: "not-a-session"}, prompt, "invalid X-Amzn-SageMaker-Session-Id", "'not-a-session'")
    refused({SESSION: "123e4567-e89b-12d3-a456-426614174000"}, prompt, "not known")
    refused({SESSION: "NEW_SESSION"}, prompt, "requestType")
    refused({}, {"requestType": "CLOSE"}, "CLOSE request needs")
    refused({}, {"requestType": "OPEN"}, "'requestType' must be NEW_SESSION or CLOSE", "'OPEN'")
    lmi_session = _new_session(url)
    _lmi(url, "Hello", lmi_session, max_new_tokens=2)
    refused({SESSION: lmi_session}, {"messages": [{"role": "user", "content": "hi"}]}, "continue it with 'inputs'",
            status=424)  # a payload that does not fit the session, as LMI answers bad payloads
    with pytest.raises(smr.exceptions.ValidationError, match="not known"):
        smr.invoke_endpoint(EndpointName=ENDPOINT, SessionId="123e4567-e89b-12d3-a456-426614174000",
                            Body=json.dumps(prompt))
    with pytest.raises(botocore.exceptions.ClientError, match="not known"):
        smr.invoke_endpoint_with_response_stream(
            EndpointName=ENDPOINT, SessionId="123e4567-e89b-12d3-a456-426614174000", Body=json.dumps(prompt))
    # A server without sessions says so instead of ignoring the header.
    plain = servers.get("scheduler").url
    res = requests.post(plain + "/invocations", json={"requestType": "NEW_SESSION"}, timeout=30)
    assert res.status_code == 400 and "option.enable_stateful_sessions=true" in res.json()["error"]


def test_a_session_streams_over_boto3(servers: ServerPool) -> None:
    url = servers.get("scheduler", **SESSIONS_ON).url
    session = _new_session(url)
    smr = sagemaker_runtime(url)
    first = _lmi(url, LMI_TURNS[0], session)
    res = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, SessionId=session, ContentType="application/json",
        Body=json.dumps({"inputs": LMI_TURNS[1], "parameters": {"max_new_tokens": 10}}))
    lines = b"".join(event["PayloadPart"]["Bytes"] for event in res["Body"]).decode().splitlines()
    streamed = json.loads(lines[-1])["generated_text"]
    assert streamed == _lmi(url, LMI_TURNS[0] + first["generated_text"] + LMI_TURNS[1])["generated_text"]


def test_turns_of_one_session_run_one_at_a_time_in_arrival_order(servers: ServerPool) -> None:
    url = servers.get("scheduler", **SESSIONS_ON).url
    session = _new_session(url)
    spans: dict[str, tuple[float, float, str]] = {}

    def stream(name: str, inputs: str) -> None:
        body = {"inputs": inputs, "parameters": {"max_new_tokens": 24, "ignore_eos_token": True}, "stream": True}
        with requests.post(url + "/invocations", json=body, headers={SESSION: session}, stream=True,
                           timeout=300) as res:
            lines = []
            first = None
            for line in res.iter_lines():
                if line:
                    first = first or time.monotonic()
                    lines.append(json.loads(line))
            spans[name] = (first or 0.0, time.monotonic(), lines[-1]["generated_text"])

    a = threading.Thread(target=stream, args=("a", LMI_TURNS[0]))
    a.start()
    time.sleep(0.3)  # b arrives while a is generating
    b = threading.Thread(target=stream, args=("b", LMI_TURNS[1]))
    b.start()
    a.join(300)
    b.join(300)
    assert spans["b"][0] >= spans["a"][1], "the second turn started before the first ended"
    # b continued after a's reply, as a stateless request with that history would
    history = LMI_TURNS[0] + spans["a"][2] + LMI_TURNS[1]
    assert spans["b"][2] == _lmi(url, history, max_new_tokens=24, ignore_eos_token=True)["generated_text"]


def test_idle_sessions_expire_and_their_cache_stays_within_its_memory_bound(
    servers: ServerPool, tokenizer: Any
) -> None:
    # fp32 KV of the demo model: 720 KiB per 16-token block, so 0.002 GiB keeps 2 blocks of idle sessions
    url = servers.get("scheduler", **SESSIONS_ON, sessions_expiration="3", sessions_max_memory="0.002").url
    session = _new_session(url)
    long_turn = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    first = _lmi(url, long_turn, session)
    assert _metric(url, "llm_session_kv_cache_bytes") <= 0.002 * 2**30
    cached, _ = _session_tokens(url)
    # its cache did not fit the bound and was dropped; the next turn recomputes and is still right
    second = _lmi(url, LMI_TURNS[1], session)
    assert _session_tokens(url)[0] == cached
    assert second["generated_text"] == _lmi(url, long_turn + first["generated_text"] + LMI_TURNS[1])["generated_text"]
    time.sleep(4.5)
    res = requests.post(url + "/invocations", json={"inputs": "Hi"}, headers={SESSION: session}, timeout=30)
    assert res.status_code == 400 and "has expired" in res.json()["error"], res.text
    assert "sessions_expiration=3" in res.json()["error"]
    assert _metric(url, "llm_sessions_open") == 0


def test_attention_sinks_lift_the_length_limits(servers: ServerPool, tokenizer: Any) -> None:
    url = servers.get("scheduler", **SESSIONS_ON, attention_sinks="4", attention_window="124",
                      max_model_len="256").url
    long_prompt = " ".join(["Once upon a time there was a small village by the sea."] * 40)
    assert len(tokenizer(long_prompt)["input_ids"]) > 256
    out = _lmi(url, long_prompt, max_new_tokens=300, ignore_eos_token=True)
    assert out["details"]["generated_tokens"] == 300
    session = _new_session(url)
    for turn in (long_prompt, " And then?", " What happened next?"):
        _lmi(url, turn, session, max_new_tokens=64)
        # a sink cache never holds more than sinks + window entries: at most 9 blocks of 16 tokens
        assert _metric(url, "llm_session_kv_cache_bytes") <= 9 * 16 * 2 * 30 * 3 * 64 * 4


@pytest.mark.parametrize("engine", ["vllm", "openvino"])
def test_attention_sinks_on_another_engine_stop_start_up_naming_the_supported_ones(engine: str) -> None:
    config = make_config(model_id="unused", rolling_batch=engine, attention_sinks=4)
    with pytest.raises(BackendUnavailable, match="supported by the scheduler and disable backends"):
        create_backend(config, None, None, 2048)  # type: ignore[arg-type]  # refused before files are read


def test_a_sink_cache_larger_than_the_model_stops_start_up() -> None:
    config = make_config(model_id="unused", rolling_batch="scheduler", attention_window=4000)
    with pytest.raises(BackendUnavailable, match="4004 exceeds the model's 2048 positions"):
        create_backend(config, None, None, 2048)  # type: ignore[arg-type]


def test_the_session_store_expires_idle_sessions_and_names_what_happened_to_an_id() -> None:
    from llm_endpoint.server.sessions import SessionError, SessionStore

    now = [1000.0]
    ended: list[str] = []
    store = SessionStore(60, ended.append, clock=lambda: now[0])
    a, b = store.create(), store.create()
    assert store.header_value(a) == f"{a.id}; Expires=1970-01-01T00:17:40Z"
    now[0] += 50
    assert store.get(a.id) is a  # a turn restarts a's idle timer, not b's
    now[0] += 20
    with pytest.raises(SessionError, match="has expired"):
        store.get(b.id)
    assert store.get(a.id) is a
    store.close(a.id)
    assert ended == [b.id, a.id] and store.open_sessions == 0
    for raw, words in ((a.id, "is closed"), ("123e4567-e89b-12d3-a456-426614174000", "not known"),
                       ("../x", "invalid X-Amzn-SageMaker-Session-Id")):
        with pytest.raises(SessionError, match=words):
            store.get(raw)
