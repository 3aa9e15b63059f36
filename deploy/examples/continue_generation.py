"""Keep generating while the model stopped only because it hit max_new_tokens (finish_reason "length").

    python deploy/examples/continue_generation.py --endpoint-name my-llm --chunk-tokens 256 \\
        --prompt "Write a long article about the benefits of regular exercise."

    AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x python deploy/examples/continue_generation.py \\
        --endpoint-name local --endpoint-url http://127.0.0.1:8080 --chunk-tokens 16 --prompt "Hi"

Each round asks for `details`, appends the round's `generated_text` to the prompt, and sends the longer
prompt again, until `details.finish_reason` is something other than "length" (the model ended it:
"eos_token" or "stop_sequence") or `--max-rounds` is reached. Generation is greedy, so every round continues
the text the way one long request would (up to re-tokenization of the joined text).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config


@dataclass(frozen=True)
class Round:
    number: int  # 1-based
    generated_text: str
    finish_reason: str
    generated_tokens: int


def make_client(region: str | None = None, endpoint_url: str | None = None, read_timeout: float = 300) -> Any:
    """A sagemaker-runtime client: one attempt (no silent re-runs of a generation), a long read timeout.

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


def generate_rounds(client: Any, endpoint: str, prompt: str, chunk_tokens: int = 256,
                    max_rounds: int = 10) -> Iterator[Round]:
    """One Round per request, continuing while finish_reason == "length" and fewer than max_rounds ran."""
    text = prompt
    for number in range(1, max_rounds + 1):
        body = {"inputs": text, "parameters": {"max_new_tokens": chunk_tokens, "do_sample": False, "details": True}}
        response = client.invoke_endpoint(EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json")
        result = json.loads(response["Body"].read())
        details = result["details"]
        generated = result["generated_text"]
        yield Round(number, generated, details["finish_reason"], details["generated_tokens"])
        text += generated
        if details["finish_reason"] != "length":
            return


def generate_until_done(client: Any, endpoint: str, prompt: str, chunk_tokens: int = 256,
                        max_rounds: int = 10) -> str:
    """The prompt followed by everything generated over the rounds."""
    rounds = generate_rounds(client, endpoint, prompt, chunk_tokens, max_rounds)
    return prompt + "".join(r.generated_text for r in rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint-name", required=True)
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    parser.add_argument("--endpoint-url", help="e.g. http://127.0.0.1:8080 for a local llm-endpoint; "
                        "omit for the real SageMaker runtime")
    parser.add_argument("--prompt", default="Write a long article about the benefits of regular exercise.")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="max_new_tokens of each request")
    parser.add_argument("--max-rounds", type=int, default=10)
    args = parser.parse_args(argv)

    client = make_client(args.region, args.endpoint_url)
    print(args.prompt, end="", flush=True)
    total_tokens = 0
    last = None
    for last in generate_rounds(client, args.endpoint_name, args.prompt, args.chunk_tokens, args.max_rounds):
        print(last.generated_text, end="", flush=True)
        total_tokens += last.generated_tokens
    if last is not None:
        print(f"\n\ntotal tokens generated: {total_tokens}\ntotal requests sent: {last.number}\n"
              f"last finish_reason: {last.finish_reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
