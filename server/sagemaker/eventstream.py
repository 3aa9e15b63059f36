"""Encoder for AWS event-stream frames (`application/vnd.amazon.eventstream`).

`invoke_endpoint_with_response_stream` answers with these frames; botocore decodes them. No maintained
encoder runs on Python 3.11 (botocore only decodes), and the format is small, so it lives here.

Frame (all integers big-endian):
    total_length u32 | headers_length u32 | prelude_crc u32 | headers | payload | message_crc u32
with prelude_crc = crc32(first 8 bytes) and message_crc = crc32(everything before it).
Each header is name_len u8 | name | type u8 | value; only type 7 (string: u16 length + UTF-8) is needed.
"""

from __future__ import annotations

import json
import struct
import zlib

_STRING = 7
# Decoders reject bigger frames: botocore allows 128 KiB of headers and 24 MiB of payload, smithy 16 MiB.
MAX_HEADERS_LENGTH = 128 * 1024
MAX_PAYLOAD_LENGTH = 16 * 1024 * 1024


def _encode_headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
        if len(raw_name) > 0xFF or len(raw_value) > 0xFFFF:
            raise ValueError(f"event-stream header {name!r} is too long")
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One complete frame with string-valued headers."""
    raw_headers = _encode_headers(headers)
    if len(raw_headers) > MAX_HEADERS_LENGTH:
        raise ValueError(f"event-stream headers are {len(raw_headers)} bytes; the limit is {MAX_HEADERS_LENGTH}")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"event-stream payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_LENGTH}")
    prelude = struct.pack(">II", 12 + len(raw_headers) + len(payload) + 4, len(raw_headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def payload_part(data: bytes) -> bytes:
    """A chunk of model output; boto3 yields it as {'PayloadPart': {'Bytes': data}}."""
    return encode_message(
        {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"},
        data,
    )


def _exception(exception_type: str, body: dict[str, str]) -> bytes:
    return encode_message(
        {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"},
        json.dumps(body).encode("utf-8"),
    )


def model_stream_error(message: str, error_code: str = "StreamBroken") -> bytes:
    """A mid-stream model failure; boto3 raises EventStreamError with Code ModelStreamError.

    SageMaker's ErrorCode values are "ModelInvocationTimeExceeded" and "StreamBroken". botocore drops
    ErrorCode from the exception, so everything the caller needs must be in `message`.
    """
    return _exception("ModelStreamError", {"Message": message, "ErrorCode": error_code})


def internal_stream_failure(message: str) -> bytes:
    """A mid-stream failure of the server itself; boto3 raises EventStreamError with Code InternalStreamFailure."""
    return _exception("InternalStreamFailure", {"Message": message})
