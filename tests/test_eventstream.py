"""The event-stream encoder, checked against botocore's own decoder and parser (what boto3 users run)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator

import botocore.session
import pytest
from botocore.awsrequest import HeadersDict
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer, EventStreamMessage
from botocore.exceptions import EventStreamError
from botocore.parsers import create_parser

from llm_endpoint.server.sagemaker.eventstream import (
    MAX_PAYLOAD_LENGTH,
    encode_message,
    internal_stream_failure,
    model_stream_error,
    payload_part,
)

OPERATION = "InvokeEndpointWithResponseStream"


class FakeRaw:
    """Stands in for urllib3's response: botocore's EventStream only calls .stream() and .close()."""

    def __init__(self, data: bytes, chunk_size: int) -> None:
        self._data, self._chunk_size = data, chunk_size

    def stream(self) -> Iterator[bytes]:
        for i in range(0, len(self._data), self._chunk_size):
            yield self._data[i : i + self._chunk_size]

    def close(self) -> None:
        pass


def decode(data: bytes, chunk_size: int | None = None) -> list[EventStreamMessage]:
    buffer = EventStreamBuffer()
    messages: list[EventStreamMessage] = []
    step = chunk_size or len(data) or 1
    for i in range(0, len(data), step):
        buffer.add_data(data[i : i + step])
        messages.extend(buffer)
    return messages


def boto3_events(data: bytes, chunk_size: int = 7) -> Iterator[dict]:
    """Parse a response body exactly as boto3 does for invoke_endpoint_with_response_stream."""
    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    response = {
        "status_code": 200,
        "headers": HeadersDict(  # case-insensitive, like the urllib3 headers botocore gets
            {
                "Content-Type": "application/vnd.amazon.eventstream",
                "x-amzn-sagemaker-content-type": "application/jsonlines",
            }
        ),
        "body": FakeRaw(data, chunk_size),
        "context": {"operation_name": OPERATION},
    }
    parsed = create_parser(model.protocol).parse(response, model.operation_model(OPERATION).output_shape)
    assert parsed["ContentType"] == "application/jsonlines"
    return iter(parsed["Body"])


def test_payload_part_headers_and_payload() -> None:
    [message] = decode(payload_part(b'{"token": "Hel"}\n'))
    assert message.headers == {
        ":event-type": "PayloadPart",
        ":content-type": "application/octet-stream",
        ":message-type": "event",
    }
    assert message.payload == b'{"token": "Hel"}\n'


def test_crcs_follow_the_spec() -> None:
    frame = payload_part(b"abc")
    assert int.from_bytes(frame[0:4], "big") == len(frame)
    assert int.from_bytes(frame[8:12], "big") == zlib.crc32(frame[:8])
    assert int.from_bytes(frame[-4:], "big") == zlib.crc32(frame[:-4])


@pytest.mark.parametrize("where", [5, 20, -6], ids=["prelude", "headers", "payload"])
def test_corruption_is_detected(where: int) -> None:
    frame = bytearray(payload_part(b"payload bytes"))
    frame[where] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        decode(bytes(frame))


def test_any_split_of_the_byte_stream_decodes() -> None:
    frames = [payload_part(b"first"), payload_part(b""), payload_part("ü€😀".encode()), model_stream_error("boom")]
    stream = b"".join(frames)
    expected = [decode(frame)[0] for frame in frames]
    for chunk_size in range(1, len(stream) + 1):
        got = decode(stream, chunk_size)
        assert [(m.headers, m.payload) for m in got] == [(m.headers, m.payload) for m in expected], chunk_size


def test_utf8_character_split_across_frames_reassembles() -> None:
    text = "Grüße, 世界 😀"
    raw = text.encode("utf-8")
    cut = raw.index("世".encode()) + 1  # inside a 3-byte character
    events = list(boto3_events(payload_part(raw[:cut]) + payload_part(raw[cut:]), chunk_size=3))
    parts = [event["PayloadPart"]["Bytes"] for event in events]
    with pytest.raises(UnicodeDecodeError):
        parts[0].decode("utf-8")
    assert b"".join(parts).decode("utf-8") == text


def test_empty_and_large_payloads() -> None:
    large = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB
    events = list(boto3_events(payload_part(b"") + payload_part(large), chunk_size=64 * 1024))
    assert events == [{"PayloadPart": {"Bytes": b""}}, {"PayloadPart": {"Bytes": large}}]


def test_limits_are_enforced_when_encoding() -> None:
    with pytest.raises(ValueError, match="payload"):
        payload_part(b"x" * (MAX_PAYLOAD_LENGTH + 1))
    with pytest.raises(ValueError, match="too long"):
        encode_message({"x" * 256: "v"}, b"")


def test_boto3_sees_payload_parts_then_model_stream_error() -> None:
    body = payload_part(b'{"token": "Hel"}\n') + payload_part(b'{"token": "lo"}\n')
    body += model_stream_error("Model invocation time exceeded", "ModelInvocationTimeExceeded")
    events = boto3_events(body)
    assert next(events) == {"PayloadPart": {"Bytes": b'{"token": "Hel"}\n'}}
    assert next(events) == {"PayloadPart": {"Bytes": b'{"token": "lo"}\n'}}
    with pytest.raises(EventStreamError) as info:
        next(events)
    assert info.value.response["Error"] == {"Code": "ModelStreamError", "Message": "Model invocation time exceeded"}


def test_model_stream_error_frame_carries_error_code() -> None:
    [message] = decode(model_stream_error("connection to model reset"))
    assert message.headers[":message-type"] == "exception"
    assert message.headers[":exception-type"] == "ModelStreamError"
    assert json.loads(message.payload) == {"Message": "connection to model reset", "ErrorCode": "StreamBroken"}


def test_boto3_sees_internal_stream_failure() -> None:
    with pytest.raises(EventStreamError) as info:
        list(boto3_events(internal_stream_failure("worker died")))
    assert info.value.response["Error"] == {"Code": "InternalStreamFailure", "Message": "worker died"}


def test_empty_stream_yields_no_events() -> None:
    assert list(boto3_events(b"")) == []
