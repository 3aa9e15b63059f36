"""Real boto3 `sagemaker-runtime` clients against a real server: InvokeEndpoint, InvokeEndpointWithResponseStream,
the modeled errors, a mid-stream failure, and the client examples in deploy/examples/.

Every call goes to 127.0.0.1 through `endpoint_url`, exactly as a user would point boto3 at a local server.
The mid-stream failure needs an engine that fails on demand: for that the real app is built in-process around
the real engine, wrapped so that prompts carrying a marker fail after three tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import EventStreamError

from deploy.examples import continue_generation, invoke
from deploy.examples import stream as stream_example
from llm_endpoint.backends.base import Backend, BackendStats
from llm_endpoint.backends.errors import BackendError
from llm_endpoint.backends.types import GenerationRequest, TokenEvent
from tests.conftest import REPO, free_port

ENDPOINT = "llm-endpoint-test"
PROMPT = "What is Deep Learning?"
GREEDY = {"do_sample": False}


def sagemaker_runtime(url: str) -> Any:
    """What a user writes for a local server: fake credentials, one attempt, a generous read timeout."""
    return boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
        config=Config(read_timeout=120, connect_timeout=10, retries={"total_max_attempts": 1}),
    )


@pytest.fixture
def smr(server) -> Any:
    return sagemaker_runtime(server.url)


def lmi_body(max_new_tokens: int, prompt: str = PROMPT, **parameters: Any) -> str:
    return json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, **GREEDY, **parameters}})


def read_json(response: dict[str, Any]) -> Any:
    return json.loads(response["Body"].read())


# ---- InvokeEndpoint ---------------------------------------------------------------------------------------------


def test_invoke_endpoint_lmi_body(smr) -> None:
    response = smr.invoke_endpoint(EndpointName=ENDPOINT, Body=lmi_body(8), ContentType="application/json")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["ResponseMetadata"]["RetryAttempts"] == 0
    assert response["ResponseMetadata"]["RequestId"]
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    result = read_json(response)
    assert set(result) == {"generated_text"}
    assert isinstance(result["generated_text"], str) and result["generated_text"]


def test_invoke_endpoint_minimal_call_sends_no_content_type(smr) -> None:
    """boto3 sends no Content-Type (and no Accept) unless asked; the body is still taken as JSON."""
    response = smr.invoke_endpoint(EndpointName=ENDPOINT, Body=lmi_body(4))
    assert response["ContentType"] == "application/json"
    assert read_json(response)["generated_text"]


def test_invoke_endpoint_chat_body(smr) -> None:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}
    response = smr.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json")
    assert response["ContentType"] == "application/json"
    result = read_json(response)
    assert result["object"] == "chat.completion"
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")
    assert result["usage"]["completion_tokens"] <= 8


def test_invoke_endpoint_details(smr) -> None:
    response = smr.invoke_endpoint(
        EndpointName=ENDPOINT, Body=lmi_body(12, details=True), ContentType="application/json",
        Accept="application/json",
    )
    result = read_json(response)
    details = result["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["inputs"] == PROMPT
    assert details["generated_tokens"] == len(details["tokens"]) <= 12
    assert "".join(t["text"] for t in details["tokens"]) == result["generated_text"]
    for token in details["tokens"]:
        assert isinstance(token["id"], int)
        assert isinstance(token["log_prob"], float) and token["log_prob"] <= 0


def test_invoke_endpoint_target_variant_and_inference_id(smr) -> None:
    response = smr.invoke_endpoint(
        EndpointName=ENDPOINT, Body=lmi_body(2), ContentType="application/json",
        TargetVariant="Canary", InferenceId="inference-0042",
    )
    assert response["InvokedProductionVariant"] == "Canary"
    assert response["ResponseMetadata"]["RequestId"] == "inference-0042"
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-request-id"] == "inference-0042"
    read_json(response)


# ---- InvokeEndpointWithResponseStream ---------------------------------------------------------------------------


def payload_parts(response: dict[str, Any]) -> list[bytes]:
    parts = []
    for event in response["Body"]:
        assert set(event) == {"PayloadPart"}, event
        parts.append(event["PayloadPart"]["Bytes"])
    return parts


def test_stream_call_streams_without_stream_flag(smr) -> None:
    response = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=lmi_body(6, details=True), ContentType="application/json"
    )
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    assert response["ContentType"] == "application/jsonlines"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    parts = payload_parts(response)
    lines = [json.loads(line) for line in b"".join(parts).splitlines()]
    assert 1 <= len(lines) <= 6
    assert all("token" in line for line in lines)
    assert "generated_text" in lines[-1] and all("generated_text" not in line for line in lines[:-1])
    assert lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)
    assert lines[-1]["details"]["finish_reason"] in ("length", "eos_token")


def test_stream_call_with_accept_json_streams_one_line_per_part(smr) -> None:
    """Accept='application/json' (common in published snippets) still streams: one JSON line per PayloadPart,
    one part per token, as LMI chooses its formatter by the stream flag rather than by Accept."""
    response = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=lmi_body(8, ignore_eos_token=True), ContentType="application/json",
        Accept="application/json",
    )
    assert response["ContentType"] == "application/jsonlines"
    parts = payload_parts(response)
    assert len(parts) == 8
    assert all(part.endswith(b"\n") and part.count(b"\n") == 1 for part in parts), parts
    lines = [json.loads(part) for part in parts]
    assert all("token" in line for line in lines)
    assert lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)
    whole = read_json(smr.invoke_endpoint(EndpointName=ENDPOINT, Body=lmi_body(8, ignore_eos_token=True),
                                          Accept="application/json"))
    assert whole["generated_text"] == lines[-1]["generated_text"]


def test_stream_call_chat_body_sends_one_sse_event_per_part(smr) -> None:
    """The role chunk, each content chunk and `[DONE]` each travel in their own PayloadPart."""
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6,
            "temperature": 0, "stream": True}
    response = smr.invoke_endpoint_with_response_stream(EndpointName=ENDPOINT, Body=json.dumps(body))
    assert response["ContentType"] == "text/event-stream"
    parts = payload_parts(response)
    assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") and p.count(b"\n\n") == 1 for p in parts), parts
    assert parts[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(p[len(b"data: "):]) for p in parts[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) == 1 + body["max_tokens"]  # the role chunk, then one per token (none empty here)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_call_target_variant_and_inference_id(smr) -> None:
    response = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=lmi_body(2), TargetVariant="Canary", InferenceId="stream-0042"
    )
    assert response["InvokedProductionVariant"] == "Canary"
    assert response["ResponseMetadata"]["RequestId"] == "stream-0042"
    assert payload_parts(response)


def test_stream_call_sse_when_accept_is_event_stream(smr) -> None:
    """boto3 sends Accept as X-Amzn-SageMaker-Accept on the stream call."""
    response = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=lmi_body(4), ContentType="application/json", Accept="text/event-stream"
    )
    assert response["ContentType"] == "text/event-stream"
    parts = payload_parts(response)
    assert parts and all(part.startswith(b"data: ") and part.endswith(b"\n\n") for part in parts)
    objects = list(stream_example.iter_json({"PayloadPart": {"Bytes": p}} for p in parts))
    assert len(objects) == len(parts)
    assert objects[-1]["generated_text"] == "".join(o["token"]["text"] for o in objects)


def test_stream_call_events_arrive_as_tokens_are_generated(smr) -> None:
    """Each PayloadPart arrives when its token is made, not all at the end: the first and last arrivals are
    spread over a good part of the call (a buffered response would put them milliseconds apart)."""
    started = time.monotonic()
    response = smr.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=lmi_body(40, ignore_eos_token=True)
    )
    arrivals = []
    for event in response["Body"]:
        assert "PayloadPart" in event
        arrivals.append(time.monotonic())
    assert len(arrivals) >= 20
    total = arrivals[-1] - started
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.25 * total, f"first part after {arrivals[0] - started:.3f} s, last after {total:.3f} s"
    # and not in a couple of bursts either: most parts come on their own
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gap > 0.002 for gap in gaps) >= len(gaps) // 2, gaps


@pytest.mark.parametrize("prompt", ["Explain in one sentence why the sky is blue.", "日本の首都は"])
def test_streamed_text_equals_non_streaming_greedy_text(smr, prompt: str) -> None:
    """Also for text whose characters span several tokens (a token may then carry "" until it completes)."""
    expected = read_json(smr.invoke_endpoint(EndpointName=ENDPOINT, Body=lmi_body(24, prompt)))["generated_text"]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, **GREEDY}}
    objects = list(stream_example.stream_lines(smr, ENDPOINT, body))
    assert "".join(o["token"]["text"] for o in objects) == expected
    assert objects[-1]["generated_text"] == expected


def test_stream_call_chat_body_reassembles_to_the_non_streaming_answer(smr) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = read_json(smr.invoke_endpoint(
        EndpointName=ENDPOINT, Body=json.dumps({"messages": messages, "max_tokens": 12, "temperature": 0}),
    ))["choices"][0]["message"]["content"]
    response_objects = list(stream_example.stream_lines(
        smr, ENDPOINT, {"messages": messages, "max_tokens": 12, "temperature": 0}
    ))
    assert all(o["object"] == "chat.completion.chunk" for o in response_objects)
    streamed = "".join(o["choices"][0]["delta"].get("content", "") for o in response_objects if o["choices"])
    assert streamed == whole


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input": PROMPT}, "inputs"),
        ({"inputs": PROMPT, "parameters": {"temperature": "hot"}}, "temperature"),
    ],
)
def test_bad_payload_raises_model_error(smr, body: dict, field: str) -> None:
    with pytest.raises(smr.exceptions.ModelError) as excinfo:
        smr.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json")
    error = excinfo.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["ResponseMetadata"]["RetryAttempts"] == 0
    assert error["Error"]["Code"] == "ModelError"
    assert error["OriginalStatusCode"] == 424
    assert field in error["Error"]["Message"] and field in error["OriginalMessage"]
    assert json.loads(error["OriginalMessage"])["code"] == 424


def test_body_that_is_not_json_raises_model_error(smr) -> None:
    with pytest.raises(smr.exceptions.ModelError) as excinfo:
        smr.invoke_endpoint(EndpointName=ENDPOINT, Body=b"not json", ContentType="application/json")
    assert "JSON" in excinfo.value.response["Error"]["Message"]


@pytest.mark.parametrize("name", ["bad_name!", "-leading-dash", "x" * 64])
def test_invalid_endpoint_name_raises_validation_error(smr, name: str) -> None:
    with pytest.raises(smr.exceptions.ValidationError) as excinfo:
        smr.invoke_endpoint(EndpointName=name, Body=lmi_body(2), ContentType="application/json")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "endpointName" in excinfo.value.response["Error"]["Message"]
    with pytest.raises(smr.exceptions.ValidationError):
        smr.invoke_endpoint_with_response_stream(EndpointName=name, Body=lmi_body(2))


def test_stream_call_with_bad_payload_raises_model_error_before_any_event(smr) -> None:
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    with pytest.raises(smr.exceptions.ModelError) as excinfo:
        smr.invoke_endpoint_with_response_stream(EndpointName=ENDPOINT, Body=body, ContentType="application/json")
    assert excinfo.value.response["OriginalStatusCode"] == 424
    assert "max_new_tokens" in excinfo.value.response["Error"]["Message"]


# ---- a failure in the engine, in-process ------------------------------------------------------------------------

FAIL_MID_STREAM = "[[inject-failure-after-3-tokens]]"
FAIL_AT_START = "[[inject-failure-before-first-token]]"
EVENTS_BEFORE_FAILURE = 3


class FailureInjectingBackend(Backend):
    """The real engine, except that a prompt containing a marker fails with a BackendError: after three real
    events (FAIL_MID_STREAM) or before the first one (FAIL_AT_START)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:  # anything else the server may read off the engine
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def load(self) -> None:
        self.inner.load()

    def stats(self) -> BackendStats:
        return self.inner.stats()

    def shutdown(self) -> None:
        self.inner.shutdown()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        prompt = request.prompt or ""
        limit = EVENTS_BEFORE_FAILURE if FAIL_MID_STREAM in prompt else 0 if FAIL_AT_START in prompt else None
        events = self.inner.generate(request)
        try:
            sent = 0
            async for event in events:
                if sent == limit:
                    raise BackendError("injected failure")
                yield event
                sent += 1
                if event.finished:
                    return
        finally:
            await events.aclose()


@pytest.fixture(scope="module")
def failing_server(model_dir: Path, backend: str) -> Iterator[str]:
    """create_app(service) as `llm-endpoint serve` builds it, with the engine wrapped, under uvicorn in a thread."""
    import uvicorn

    from llm_endpoint.server.app import create_app
    from llm_endpoint.server.cli import build_service
    from llm_endpoint.server.config import load_config

    service = build_service(load_config(model_dir, {"OPTION_ROLLING_BATCH": backend}))
    service.backend = FailureInjectingBackend(service.backend)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="failing-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert thread.is_alive(), "the in-process server stopped during start-up"
            assert time.monotonic() < deadline, "the in-process server did not become healthy"
            try:
                if requests.get(url + "/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=60)


def failing_body(marker: str, stream: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": f"{PROMPT} {marker}",
        "parameters": {"max_new_tokens": 16, "ignore_eos_token": True, **GREEDY},
    }
    if stream is not None:
        body["stream"] = stream
    return body


def test_mid_stream_failure_raises_event_stream_error(failing_server: str) -> None:
    client = sagemaker_runtime(failing_server)
    response = client.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=json.dumps(failing_body(FAIL_MID_STREAM)), ContentType="application/json"
    )
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    parts: list[bytes] = []
    with pytest.raises(EventStreamError) as excinfo:
        for event in response["Body"]:
            parts.append(event["PayloadPart"]["Bytes"])
    error = excinfo.value.response["Error"]
    assert error["Code"] == "ModelStreamError"
    assert "injected failure" in error["Message"]
    lines = [json.loads(line) for line in b"".join(parts).splitlines()]
    assert len(lines) == EVENTS_BEFORE_FAILURE
    assert all("token" in line and "generated_text" not in line for line in lines)

    # the examples' reader surfaces the same error while iterating
    with pytest.raises(EventStreamError) as excinfo:
        list(stream_example.stream_lines(client, ENDPOINT, failing_body(FAIL_MID_STREAM)))
    assert excinfo.value.response["Error"]["Code"] == "ModelStreamError"

    # the failure was that request's alone: the server keeps serving
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    objects = list(stream_example.stream_lines(client, ENDPOINT, body))
    assert objects and "generated_text" in objects[-1]


def test_failure_before_first_token_raises_model_error_from_the_stream_call(failing_server: str) -> None:
    client = sagemaker_runtime(failing_server)
    with pytest.raises(client.exceptions.ModelError) as excinfo:
        client.invoke_endpoint_with_response_stream(
            EndpointName=ENDPOINT, Body=json.dumps(failing_body(FAIL_AT_START)), ContentType="application/json"
        )
    assert "injected failure" in excinfo.value.response["Error"]["Message"]


def test_engine_failure_on_non_streaming_invoke_endpoint_is_model_error(failing_server: str) -> None:
    client = sagemaker_runtime(failing_server)
    with pytest.raises(client.exceptions.ModelError) as excinfo:
        client.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(failing_body(FAIL_MID_STREAM)))
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert "injected failure" in excinfo.value.response["Error"]["Message"]


def test_mid_stream_failure_on_lmi_invocations_ends_with_in_band_error(failing_server: str) -> None:
    with requests.post(failing_server + "/invocations", json=failing_body(FAIL_MID_STREAM, stream=True),
                       stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/jsonlines"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) == EVENTS_BEFORE_FAILURE + 1
    assert all("token" in line for line in lines[:-1])
    assert lines[-1] == {"error": "injected failure", "code": 424}


def test_engine_failure_on_non_streaming_lmi_invocations_is_424(failing_server: str) -> None:
    response = requests.post(failing_server + "/invocations", json=failing_body(FAIL_MID_STREAM), timeout=120)
    assert response.status_code == 424
    assert response.json() == {"error": "injected failure", "code": 424}


# ---- deploy/examples/invoke.py ----------------------------------------------------------------------------------


def test_confidence_is_exp_of_mean_log_prob() -> None:
    tokens = [{"text": "a", "log_prob": -0.5}, {"text": "b", "log_prob": -1.5}, {"text": "", "log_prob": 0.0}]
    assert invoke.confidence(tokens) == pytest.approx(math.exp(-2.0 / 3))
    assert invoke.confidence([{"log_prob": 0.0}]) == 1.0
    with pytest.raises(ValueError):
        invoke.confidence([])


def test_generate_with_confidence(smr) -> None:
    text, confidence = invoke.generate_with_confidence(smr, ENDPOINT, PROMPT, 16)
    assert text
    assert 0 < confidence <= 1
    # recomputed from the details of the same (greedy) generation
    result = invoke.invoke_json(
        smr, ENDPOINT, {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "details": True, **GREEDY}}
    )
    assert result["generated_text"] == text
    log_probs = [t["log_prob"] for t in result["details"]["tokens"]]
    assert confidence == pytest.approx(math.exp(sum(log_probs) / len(log_probs)), rel=1e-4)


def test_make_client_for_a_local_server(server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for module in (invoke, stream_example, continue_generation):
        client = module.make_client(None, server.url)
        assert client.meta.region_name == "us-east-1"
        assert client.meta.config.retries["total_max_attempts"] == 1
        assert client.meta.config.read_timeout == 300
    response = client.invoke_endpoint(EndpointName=ENDPOINT, Body=lmi_body(2))
    assert read_json(response)["generated_text"]


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [sys.executable, str(REPO / "deploy" / "examples" / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_example_scripts_run_against_a_local_server(server) -> None:
    common = ["--endpoint-name", ENDPOINT, "--endpoint-url", server.url, "--prompt", PROMPT]
    done = run_example("invoke.py", *common, "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert "Overall confidence score in the generated text: " in done.stdout
    done = run_example("stream.py", *common, "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "finish_reason: length" in done.stderr
    done = run_example("continue_generation.py", *common, "--chunk-tokens", "4", "--max-rounds", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(PROMPT) and "total requests sent: 2" in done.stdout


# ---- deploy/examples/stream.py ----------------------------------------------------------------------------------


def parts(*chunks: bytes) -> list[dict[str, Any]]:
    return [{"PayloadPart": {"Bytes": chunk}} for chunk in chunks]


def test_iter_lines_joins_a_line_cut_across_parts() -> None:
    events = parts(b'{"token": {"te', b'xt": "Hel', b'lo"}}\n')
    assert list(stream_example.iter_json(events)) == [{"token": {"text": "Hello"}}]


def test_iter_lines_splits_several_lines_in_one_part() -> None:
    events = parts(b'{"a": 1}\n{"a": 2}\n{"a"', b': 3}\n')
    assert list(stream_example.iter_json(events)) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_iter_lines_rejoins_a_utf8_character_cut_across_parts() -> None:
    line = json.dumps({"token": {"text": "héllo 世界 🙂"}}, ensure_ascii=False).encode() + b"\n"
    cut = line.index("世".encode()) + 1  # inside the 3-byte character
    emoji = line.index("🙂".encode()) + 2  # inside the 4-byte character
    events = parts(line[:cut], line[cut:emoji], line[emoji:])
    assert list(stream_example.iter_json(events)) == [{"token": {"text": "héllo 世界 🙂"}}]


def test_iter_json_reads_server_sent_events() -> None:
    events = parts(
        b'data: {"a": 1}\n\ndata: {"a"', b": 2}\n", b"\n: a comment\nevent: message\ndata:{\"a\": 3}\r\n\r\n",
        b"data: [DONE]\n\n",
    )
    assert list(stream_example.iter_json(events)) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_iter_lines_keeps_a_last_line_without_newline_and_skips_other_events() -> None:
    events = [*parts(b'{"a": 1}\n{"a"'), {"SomethingElse": {}}, *parts(b": 2}")]
    assert list(stream_example.iter_json(events)) == [{"a": 1}, {"a": 2}]
    assert list(stream_example.iter_lines(parts(b"", b"\n", b""))) == [b""]
    assert list(stream_example.iter_json(parts())) == []


def test_iter_json_is_independent_of_how_the_bytes_were_cut() -> None:
    objects = [{"token": {"text": t}} for t in ("Ünï", "cødé", " 漢字", "🙂!", "")]
    data = b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objects)
    for size in range(1, len(data) + 1):
        events = parts(*(data[i : i + size] for i in range(0, len(data), size)))
        assert list(stream_example.iter_json(events)) == objects, size


class CannedStreamClient:
    """Answers invoke_endpoint_with_response_stream with fixed PayloadParts, and keeps what it was sent."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.calls: list[dict[str, Any]] = []

    def invoke_endpoint_with_response_stream(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        return {"Body": iter(parts(*self.chunks))}


def test_stream_lines_sends_the_body_and_accept() -> None:
    client = CannedStreamClient(b'data: {"a": 1}\n\n')
    objects = stream_example.stream_lines(client, ENDPOINT, {"inputs": "x"}, accept="text/event-stream")
    assert list(objects) == [{"a": 1}]
    assert client.calls == [{"EndpointName": ENDPOINT, "Body": '{"inputs": "x"}', "ContentType": "application/json",
                             "Accept": "text/event-stream"}]


def test_stream_text_raises_on_an_in_band_error_line() -> None:
    client = CannedStreamClient(b'{"token": {"text": "a"}}\n{"error": "engine died", "code": 424}\n')
    with pytest.raises(stream_example.StreamFailed, match="engine died"):
        stream_example.stream_text(client, ENDPOINT, PROMPT, 8)


def test_stream_text_against_the_server(smr) -> None:
    seen: list[str] = []
    text, last = stream_example.stream_text(smr, ENDPOINT, PROMPT, 8, on_token=seen.append, details=True, **GREEDY)
    assert text == last["generated_text"] == "".join(seen)
    assert last["details"]["finish_reason"] in ("length", "eos_token")


# ---- deploy/examples/continue_generation.py ---------------------------------------------------------------------


def test_generate_until_done_continues_while_finish_reason_is_length(smr) -> None:
    max_rounds = 4
    rounds = list(continue_generation.generate_rounds(smr, ENDPOINT, PROMPT, chunk_tokens=8, max_rounds=max_rounds))
    assert len(rounds) >= 2
    assert [r.number for r in rounds] == list(range(1, len(rounds) + 1))
    assert all(r.finish_reason == "length" and r.generated_tokens == 8 for r in rounds[:-1])
    assert rounds[-1].finish_reason != "length" or len(rounds) == max_rounds
    assert all(r.generated_text for r in rounds)
    # greedy, so the same two first rounds again
    text = continue_generation.generate_until_done(smr, ENDPOINT, PROMPT, chunk_tokens=8, max_rounds=2)
    assert text == PROMPT + rounds[0].generated_text + rounds[1].generated_text
