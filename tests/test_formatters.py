"""Response formatters: LMI bytes as djl-serving's unit tests pin them, and OpenAI/TGI clients reading ours."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llm_endpoint.backends.types import FinishReason, Token, TokenEvent
from llm_endpoint.server.formatters import make_formatter
from llm_endpoint.server.formatters.chat import ChatChunkFormatter, ChatCompletionFormatter
from llm_endpoint.server.formatters.lmi import LmiJsonFormatter, LmiStreamFormatter
from llm_endpoint.server.protocol import OutputOptions

PROMPT = "This is a wonderful day"
HE, LLO, WORLD = Token(244, "He", -0.334532), Token(576, "llo", -0.123123), Token(4558, " world", -0.567854)


def hello_world(finish: FinishReason = FinishReason.LENGTH, **first: Any) -> list[TokenEvent]:
    """The three tokens of djl-serving's test_rolling_batch.py; `first` adds fields to the first event."""
    return [
        TokenEvent(HE, **first),
        TokenEvent(LLO),
        TokenEvent(WORLD, finish_reason=finish, prompt_tokens=5),
    ]


def lmi(formatter: str = "json", **kw: Any) -> OutputOptions:
    return OutputOptions(kind="lmi", stream=formatter != "json", formatter=formatter, inputs=PROMPT, **kw)


def chat(stream: bool = False, formatter: str = "sse", **kw: Any) -> OutputOptions:
    return OutputOptions(kind="chat", stream=stream, formatter=formatter, inputs=PROMPT, model="m", **kw)


def assert_one_event(frame: str, framing: str) -> None:
    if framing == "sse":
        assert frame.startswith("data: ") and frame.endswith("\n\n") and frame.count("\n\n") == 1, frame
        if frame != "data: [DONE]\n\n":
            json.loads(frame[len("data: "):])
    elif framing == "jsonlines":
        assert frame.endswith("\n") and frame.count("\n") == 1, frame
        json.loads(frame)
    else:
        json.loads(frame)


def feed(options: OutputOptions, events: list[TokenEvent]) -> tuple[list[str], bytes]:
    """What `on_event` returned, joined per event, and `body()`; the two must always agree, and every frame is
    one complete event (a JSON line, an SSE event or the whole body)."""
    fmt = make_formatter(options, "req-1")
    frames = [fmt.on_event(e) for e in events]
    for frame in (f for per_event in frames for f in per_event):
        assert_one_event(frame, fmt.framing)
    chunks = ["".join(per_event) for per_event in frames]
    body = fmt.body()
    assert body == "".join(chunks).encode()
    return chunks, body


# ---------------------------------------------------------------------------------------------- LMI json


def test_json_fmt() -> None:
    chunks, body = feed(lmi(), hello_world())
    assert chunks[:2] == ["", ""]
    assert body == b'{"generated_text": "Hello world"}'


def test_return_full_text() -> None:
    _, body = feed(lmi(return_full_text=True), hello_world())
    assert body == b'{"generated_text": "This is a wonderful dayHello world"}'


def test_details_key_order() -> None:
    _, body = feed(lmi(details=True), hello_world())
    assert body == (
        b'{"generated_text": "Hello world", "details": {"finish_reason": "length", "generated_tokens": 3, '
        b'"inputs": "This is a wonderful day", "tokens": [{"id": 244, "text": "He", "log_prob": -0.334532}, '
        b'{"id": 576, "text": "llo", "log_prob": -0.123123}, {"id": 4558, "text": " world", "log_prob": -0.567854}]}}'
    )


def test_details_prefill_and_top_tokens_follow_tokens() -> None:
    prefill = [Token(4, "This", None), Token(5, " is", -0.4)]
    events = hello_world(prefill=prefill)
    for e in events:
        e.top_tokens = [e.token, Token(1, "x", -9.5)]
    _, body = feed(lmi(details=True), events)
    details = json.loads(body)["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "inputs", "tokens", "prefill", "top_tokens"]
    assert details["prefill"] == [
        {"id": 4, "text": "This", "log_prob": None},
        {"id": 5, "text": " is", "log_prob": -0.4},
    ]
    assert details["top_tokens"][2] == [
        {"id": 4558, "text": " world", "log_prob": -0.567854},
        {"id": 1, "text": "x", "log_prob": -9.5},
    ]


def test_special_token_flag_only_when_special() -> None:
    events = [TokenEvent(HE), TokenEvent(Token(2, "</s>", -0.1, special=True), finish_reason=FinishReason.EOS_TOKEN)]
    _, body = feed(lmi(details=True), events)
    assert json.loads(body)["details"]["tokens"] == [
        {"id": 244, "text": "He", "log_prob": -0.334532},
        {"id": 2, "text": "</s>", "log_prob": -0.1, "special_token": True},
    ]
    _, body = feed(lmi(details=True, tgi_compat=True), events)
    assert json.loads(body)[0]["details"]["tokens"][1] == {"id": 2, "text": "</s>", "logprob": -0.1, "special": True}


def test_fmt_hf_compat() -> None:
    _, body = feed(lmi(tgi_compat=True, details=True, return_full_text=True), hello_world())
    assert body == (
        b'[{"generated_text": "This is a wonderful dayHello world", "details": {"finish_reason": "length", '
        b'"generated_tokens": 3, "inputs": "This is a wonderful day", "tokens": [{"id": 244, "text": "He", '
        b'"logprob": -0.334532}, {"id": 576, "text": "llo", "logprob": -0.123123}, '
        b'{"id": 4558, "text": " world", "logprob": -0.567854}]}}]'
    )


def test_error_finish_without_details_reports_finish_reason() -> None:
    _, body = feed(lmi(), hello_world(FinishReason.ERROR))
    assert body == b'{"generated_text": "Hello world", "details": {"finish_reason": "error"}}'


def test_non_ascii_is_written_as_utf8() -> None:
    events = [TokenEvent(Token(9, "café ✓", -0.5), finish_reason=FinishReason.EOS_TOKEN)]
    _, body = feed(lmi(), events)
    assert body == '{"generated_text": "café ✓"}'.encode()


# ----------------------------------------------------------------------------------------- LMI streams


def test_jsonlines_fmt() -> None:
    chunks, _ = feed(lmi("jsonlines"), hello_world())
    assert chunks == [
        '{"token": {"id": 244, "text": "He", "log_prob": -0.334532}}\n',
        '{"token": {"id": 576, "text": "llo", "log_prob": -0.123123}}\n',
        '{"token": {"id": 4558, "text": " world", "log_prob": -0.567854}, "generated_text": "Hello world"}\n',
    ]


def test_return_full_text_stream() -> None:
    chunks, _ = feed(lmi("jsonlines", return_full_text=True), hello_world())
    assert chunks[-1] == (
        '{"token": {"id": 4558, "text": " world", "log_prob": -0.567854}, '
        '"generated_text": "This is a wonderful dayHello world"}\n'
    )


def test_details_stream_has_no_tokens() -> None:
    chunks, _ = feed(lmi("jsonlines", details=True), hello_world())
    assert chunks[-1] == (
        '{"token": {"id": 4558, "text": " world", "log_prob": -0.567854}, "generated_text": "Hello world", '
        '"details": {"finish_reason": "length", "generated_tokens": 3, "inputs": "This is a wonderful day"}}\n'
    )


def test_stream_details_carry_prefill_and_top_tokens_lines_do_not() -> None:
    events = hello_world(prefill=[Token(4, "This", None)])
    for e in events:
        e.top_tokens = [e.token]
    chunks, _ = feed(lmi("jsonlines", details=True), events)
    assert chunks[0] == '{"token": {"id": 244, "text": "He", "log_prob": -0.334532}}\n'
    details = json.loads(chunks[-1])["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "inputs", "prefill", "top_tokens"]
    assert details["prefill"] == [{"id": 4, "text": "This", "log_prob": None}]
    assert len(details["top_tokens"]) == 3


def test_sse_fmt() -> None:
    chunks, _ = feed(lmi("sse"), hello_world())
    assert chunks == [
        'data: {"token": {"id": 244, "text": "He", "log_prob": -0.334532}}\n\n',
        'data: {"token": {"id": 576, "text": "llo", "log_prob": -0.123123}}\n\n',
        'data: {"token": {"id": 4558, "text": " world", "log_prob": -0.567854}, "generated_text": "Hello world"}\n\n',
    ]


def test_sse_tgi_compat_fmt() -> None:
    chunks, _ = feed(lmi("sse", tgi_compat=True, details=True), hello_world())
    assert chunks[0] == 'data: {"token": {"id": 244, "text": "He", "logprob": -0.334532}}\n\n'
    assert chunks[-1] == (
        'data: {"token": {"id": 4558, "text": " world", "logprob": -0.567854}, "generated_text": "Hello world", '
        '"details": {"finish_reason": "length", "generated_tokens": 3, "inputs": "This is a wonderful day"}}\n\n'
    )


@pytest.mark.parametrize(
    ("formatter", "expected"),
    [
        ("jsonlines", '{"error":"exception occurred during rolling batch inference","code":424}\n'),
        ("sse", 'data: {"error":"exception occurred during rolling batch inference","code":424}\n\n'),
        ("json", '{"error":"exception occurred during rolling batch inference","code":424}'),
    ],
)
def test_lmi_error_chunk(formatter: str, expected: str) -> None:
    fmt = make_formatter(lmi(formatter), "req-1")
    fmt.on_event(TokenEvent(HE))
    assert fmt.on_error("exception occurred during rolling batch inference") == [expected]


# --------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("options", "cls", "content_type"),
    [
        (lmi(), LmiJsonFormatter, "application/json"),
        (lmi(tgi_compat=True, details=True), LmiJsonFormatter, "application/json"),
        (lmi("jsonlines"), LmiStreamFormatter, "application/jsonlines"),
        (lmi("sse"), LmiStreamFormatter, "text/event-stream"),
        (lmi("sse", tgi_compat=True), LmiStreamFormatter, "text/event-stream"),
        (chat(), ChatCompletionFormatter, "application/json"),
        (chat(stream=True), ChatChunkFormatter, "text/event-stream"),
        (chat(stream=True, formatter="jsonlines"), ChatChunkFormatter, "application/jsonlines"),
    ],
)
def test_make_formatter(options: OutputOptions, cls: type, content_type: str) -> None:
    fmt = make_formatter(options, "req-1")
    assert type(fmt) is cls
    assert fmt.content_type == content_type


# ---------------------------------------------------------------------------------------------- chat


def test_chat_completion_shape() -> None:
    _, body = feed(chat(), hello_world(FinishReason.EOS_TOKEN))
    out = json.loads(body)
    assert isinstance(out.pop("created"), int)
    assert out == {
        "id": "chatcmpl-req-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (FinishReason.LENGTH, "length"),
        (FinishReason.EOS_TOKEN, "stop"),
        (FinishReason.STOP_SEQUENCE, "stop"),
        (FinishReason.ERROR, "error"),
    ],
)
def test_chat_finish_reasons(reason: FinishReason, expected: str) -> None:
    _, body = feed(chat(), hello_world(reason))
    assert json.loads(body)["choices"][0]["finish_reason"] == expected
    chunks, _ = feed(chat(stream=True, formatter="jsonlines"), hello_world(reason))
    assert [json.loads(line)["choices"][0]["finish_reason"] for line in chunks[-1].splitlines()] == [expected]


def test_chat_logprobs_use_utf8_bytes_and_top_logprobs_limit() -> None:
    events = [
        TokenEvent(Token(7, "é", -0.25), top_tokens=[Token(7, "é", -0.25), Token(8, "e", -1.5), Token(9, "a", -3.0)]),
        TokenEvent(Token(3, "", -0.75), top_tokens=[Token(3, "", -0.75), Token(4, "x", -2.0), Token(5, "y", -4.0)]),
        TokenEvent(WORLD, [WORLD, Token(1, "!", -1.0), Token(2, "?", -2.0)], finish_reason=FinishReason.LENGTH),
    ]
    _, body = feed(chat(logprobs=True, top_logprobs=2), events)
    content = json.loads(body)["choices"][0]["logprobs"]["content"]
    assert content[0] == {
        "token": "é",
        "logprob": -0.25,
        "bytes": [195, 169],
        "top_logprobs": [
            {"token": "é", "logprob": -0.25, "bytes": [195, 169]},
            {"token": "e", "logprob": -1.5, "bytes": [101]},
        ],
    }
    assert content[1]["bytes"] == []
    assert content[1]["top_logprobs"][1] == {"token": "x", "logprob": -2.0, "bytes": [120]}
    assert [entry["token"] for entry in content] == ["é", "", " world"]


def sse_payloads(stream: str) -> list[str]:
    """The `data:` payloads of an SSE stream, checking that every event is exactly `data: ...\\n\\n`."""
    assert stream.endswith("\n\n")
    events = stream[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e[len("data: ") :] for e in events]


def test_chat_stream_chunks() -> None:
    chunks, _ = feed(chat(stream=True, include_usage=True), hello_world())
    payloads = sse_payloads("".join(chunks))
    assert payloads[-1] == "[DONE]"
    objs = [json.loads(p) for p in payloads[:-1]]
    assert {(o["id"], o["object"], o["model"], o["created"]) for o in objs} == {
        ("chatcmpl-req-1", "chat.completion.chunk", "m", objs[0]["created"])
    }
    assert [o["choices"][0]["delta"] if o["choices"] else None for o in objs] == [
        {"role": "assistant", "content": ""},
        {"content": "He"},
        {"content": "llo"},
        {"content": " world"},
        None,
    ]
    assert [o["choices"][0]["finish_reason"] for o in objs[:-1]] == [None, None, None, "length"]
    assert [o["usage"] for o in objs[:-1]] == [None] * 4
    assert objs[-1]["choices"] == []
    assert objs[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_chat_stream_without_usage_has_no_usage_key() -> None:
    chunks, _ = feed(chat(stream=True), hello_world())
    objs = [json.loads(p) for p in sse_payloads("".join(chunks))[:-1]]
    assert len(objs) == 4 and all("usage" not in o for o in objs)


def test_chat_stream_pending_text_sends_nothing_unless_logprobs() -> None:
    events = [
        TokenEvent(HE),
        TokenEvent(Token(3, "", -0.5)),
        TokenEvent(Token(4, "", -0.5), finish_reason=FinishReason.EOS_TOKEN),
    ]
    chunks, _ = feed(chat(stream=True, formatter="jsonlines"), events)
    assert chunks[1] == ""
    last = json.loads(chunks[2])["choices"][0]
    assert last["delta"] == {"content": ""} and last["finish_reason"] == "stop"

    chunks, _ = feed(chat(stream=True, formatter="jsonlines", logprobs=True), events)
    assert json.loads(chunks[1])["choices"][0]["logprobs"] == {
        "content": [{"token": "", "logprob": -0.5, "bytes": [], "top_logprobs": []}]
    }


def test_chat_stream_single_event_role_chunk_has_no_finish_reason() -> None:
    chunks, _ = feed(chat(stream=True, formatter="jsonlines"), [TokenEvent(HE, finish_reason=FinishReason.LENGTH)])
    lines = [json.loads(line) for line in chunks[0].splitlines()]
    assert [line["choices"][0]["finish_reason"] for line in lines] == [None, "length"]


def test_chat_jsonlines_has_no_done() -> None:
    chunks, _ = feed(chat(stream=True, formatter="jsonlines", include_usage=True), hello_world())
    lines = "".join(chunks).splitlines()
    assert len(lines) == 5 and all(json.loads(line)["object"] == "chat.completion.chunk" for line in lines)


def test_chat_error_chunk() -> None:
    error = '{"error": {"message": "boom", "type": "server_error", "param": null, "code": 424}}'
    assert make_formatter(chat(stream=True), "r").on_error("boom") == [f"data: {error}\n\n", "data: [DONE]\n\n"]
    assert make_formatter(chat(stream=True, formatter="jsonlines"), "r").on_error("boom") == [error + "\n"]


# ---------------------------------------------------------------------- real clients over local HTTP


@dataclass
class Canned:
    """One HTTP response to play back, written chunk by chunk so clients decode it incrementally."""

    content_type: str
    chunks: list[str]
    requests: list[dict] = field(default_factory=list)


@pytest.fixture
def canned_server() -> Iterator[tuple[str, Canned]]:
    canned = Canned("application/json", [])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            canned.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", canned.content_type)
            self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when the connection closes
            for chunk in canned.chunks:
                self.wfile.write(chunk.encode())
                self.wfile.flush()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", canned
    server.shutdown()
    server.server_close()


def serve(canned: Canned, options: OutputOptions, events: list[TokenEvent], error: str | None = None) -> None:
    fmt = make_formatter(options, "req-1")
    canned.content_type = fmt.content_type
    canned.chunks = [f for e in events for f in fmt.on_event(e)] + (fmt.on_error(error) if error else [])


def test_openai_client_reads_chat_stream(canned_server: tuple[str, Canned]) -> None:
    openai = pytest.importorskip("openai")
    url, canned = canned_server
    events = hello_world()
    for e in events:
        e.top_tokens = [e.token, Token(1, "¿", -3.0)]
    serve(canned, chat(stream=True, include_usage=True, logprobs=True, top_logprobs=2), events)
    client = openai.OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    top = chunks[1].choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, t.bytes) for t in top] == [("He", [72, 101]), ("¿", [194, 191])]


def test_openai_client_raises_on_chat_stream_error(canned_server: tuple[str, Canned]) -> None:
    openai = pytest.importorskip("openai")
    url, canned = canned_server
    serve(canned, chat(stream=True), hello_world()[:2], error="engine failed")
    client = openai.OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="engine failed"):
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "He", "llo"]


def test_openai_client_reads_chat_completion(canned_server: tuple[str, Canned]) -> None:
    openai = pytest.importorskip("openai")
    url, canned = canned_server
    serve(canned, chat(logprobs=True), hello_world(FinishReason.STOP_SEQUENCE))
    client = openai.OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0)
    completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert [c.token for c in completion.choices[0].logprobs.content] == ["He", "llo", " world"]
    assert completion.usage.completion_tokens == 3


def test_huggingface_client_reads_tgi_responses(canned_server: tuple[str, Canned]) -> None:
    """As djl-serving's tgi_client.py: the TGI-compat integration test drives huggingface_hub's InferenceClient."""
    hub = pytest.importorskip("huggingface_hub")
    url, canned = canned_server
    client = hub.InferenceClient(model=f"{url}/invocations")

    serve(canned, lmi(tgi_compat=True, details=True), hello_world())
    out = client.text_generation(PROMPT, max_new_tokens=3, details=True)
    assert out.generated_text == "Hello world"
    assert out.details.finish_reason == "length" and [t.logprob for t in out.details.tokens][0] == -0.334532

    serve(canned, lmi("sse", tgi_compat=True, details=True), hello_world())
    chunks = list(client.text_generation(PROMPT, max_new_tokens=3, details=True, stream=True))
    assert [c.token.id for c in chunks] == [244, 576, 4558]
    assert all(isinstance(c.token.logprob, float) for c in chunks)
    assert chunks[-1].generated_text == "Hello world" and chunks[-1].details.generated_tokens == 3

    serve(canned, lmi("sse", tgi_compat=True, details=True), hello_world()[:1], error="engine failed")
    with pytest.raises(Exception, match="engine failed"):
        list(client.text_generation(PROMPT, max_new_tokens=3, details=True, stream=True))
