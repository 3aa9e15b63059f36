"""Stream tokens from an LMI endpoint with InvokeEndpointWithResponseStream, printing them as they arrive.

    python deploy/examples/stream.py --endpoint-name my-llm --prompt "What is Deep Learning?"

    AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \\
        python deploy/examples/stream.py --endpoint-name local --endpoint-url http://127.0.0.1:8080 --prompt "Hi"

The stream call streams whatever the body says (no `"stream": true` needed). Each event is
`{"PayloadPart": {"Bytes": b"..."}}`, and a PayloadPart is *not* a line: one line may be cut across several
parts (even inside a multi-byte UTF-8 character), and one part may hold several lines. So the bytes are
buffered and split on b"\\n", the way the LineIterator of AWS's LMI examples does, and only whole lines are
decoded. The model's lines are JSON lines (`application/jsonlines`, LMI's default) or, when asked for with
`--accept text/event-stream`, server-sent events (`data: {...}` followed by a blank line).

A failure after the stream started arrives as a ModelStreamError event: boto3 raises
`botocore.exceptions.EventStreamError` with `e.response["Error"]["Code"] == "ModelStreamError"` while the
events are iterated (not `client.exceptions.ModelStreamError`). A failure before it started (a bad payload)
raises `client.exceptions.ModelError` from the call itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import boto3
from botocore.config import Config


class StreamFailed(Exception):
    """The model reported an error on the stream (LMI's in-band `{"error": ..., "code": ...}` line)."""


def make_client(region: str | None = None, endpoint_url: str | None = None, read_timeout: float = 300) -> Any:
    """A sagemaker-runtime client: one attempt, and `read_timeout` as the longest wait between two events.

    For a local server (`endpoint_url`) without AWS_ACCESS_KEY_ID or AWS_PROFILE set, placeholder
    credentials are used: boto3 always signs, and the local server does not check the signature.
    """
    config = Config(read_timeout=read_timeout, connect_timeout=10, retries={"total_max_attempts": 1})
    kwargs: dict[str, Any] = {"region_name": region, "endpoint_url": endpoint_url, "config": config}
    if endpoint_url:
        kwargs["region_name"] = region or "us-east-1"
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get("AWS_PROFILE"):
            kwargs.update(aws_access_key_id="x", aws_secret_access_key="x")
    return boto3.client("sagemaker-runtime", **kwargs)


def iter_lines(events: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """Whole lines (without the line ending) from a stream of PayloadPart events, however they were cut."""
    buffer = b""
    for event in events:
        part = event.get("PayloadPart")
        if part is None:  # other event types carry no model bytes
            continue
        buffer += part["Bytes"]
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if buffer.strip():  # a last line without a line ending
        yield buffer.rstrip(b"\r")


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One JSON object from a JSON line or an SSE `data:` line; None for lines that carry none (the blank
    line between SSE events, other SSE fields, comments, and `data: [DONE]`)."""
    text = line.decode("utf-8").strip()
    if not text:
        return None
    if text.startswith("data:"):
        text = text[len("data:"):].strip()
        if text == "[DONE]":
            return None
    elif text.startswith((":", "event:", "id:", "retry:")):
        return None
    return json.loads(text)


def iter_json(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The JSON objects in a stream of PayloadPart events."""
    for line in iter_lines(events):
        obj = parse_line(line)
        if obj is not None:
            yield obj


def stream_lines(client: Any, endpoint: str, body: dict[str, Any] | bytes | str,
                 accept: str | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Call InvokeEndpointWithResponseStream and yield each JSON object of the response as it arrives."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if accept:
        kwargs["Accept"] = accept
    response = client.invoke_endpoint_with_response_stream(
        EndpointName=endpoint, Body=body, ContentType="application/json", **kwargs
    )
    yield from iter_json(response["Body"])


def stream_text(client: Any, endpoint: str, prompt: str, max_new_tokens: int = 128,
                on_token: Callable[[str], None] | None = None, **parameters: Any) -> tuple[str, dict[str, Any]]:
    """Stream an LMI generation; the text put together from the tokens, and the final line (which holds
    `generated_text`, and `details` when `details=True` was passed)."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, **parameters}}
    pieces: list[str] = []
    last: dict[str, Any] = {}
    for obj in stream_lines(client, endpoint, body):
        if "error" in obj:
            raise StreamFailed(f"{obj['error']} (code {obj.get('code')})")
        text = (obj.get("token") or {}).get("text") or ""
        pieces.append(text)
        if on_token and text:
            on_token(text)
        last = obj
    return "".join(pieces), last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint-name", required=True)
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    parser.add_argument("--endpoint-url", help="e.g. http://127.0.0.1:8080 for a local llm-endpoint; "
                        "omit for the real SageMaker runtime")
    parser.add_argument("--prompt", default="What is Deep Learning?")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--accept", help="e.g. text/event-stream; default: the server's (JSON lines)")
    parser.add_argument("--raw", action="store_true", help="print each JSON object instead of the text")
    args = parser.parse_args(argv)

    client = make_client(args.region, args.endpoint_url)
    if args.raw:
        body = {"inputs": args.prompt, "parameters": {"max_new_tokens": args.max_new_tokens, "details": True}}
        for obj in stream_lines(client, args.endpoint_name, body, accept=args.accept):
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        return 0

    def show(text: str) -> None:
        print(text, end="", flush=True)

    _, last = stream_text(client, args.endpoint_name, args.prompt, args.max_new_tokens, on_token=show, details=True)
    print(f"\n\nfinish_reason: {last.get('details', {}).get('finish_reason')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
