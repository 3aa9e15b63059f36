"""Call an LMI endpoint once and score the answer: `details` -> per-token log-probs -> a confidence score.

    # a real SageMaker endpoint (credentials and region from the usual AWS environment)
    python deploy/examples/invoke.py --endpoint-name my-llm --prompt "What is Deep Learning?"

    # a local `llm-endpoint serve` (it ignores the SigV4 signature, so any credentials do)
    AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \\
        python deploy/examples/invoke.py --endpoint-name local --endpoint-url http://127.0.0.1:8080 --prompt "Hi"

With `"details": true` LMI returns every generated token with its `log_prob`. exp(mean(log_prob)) is the
geometric mean of the token probabilities: a number in (0, 1], a rough (and, uncalibrated, overconfident)
measure of how sure the model was of its own text.

The client is built with one attempt and a long read timeout: botocore's default (legacy) retry mode
re-sends a request whose response takes longer than `read_timeout` (60 s) up to 4 more times, which for an
LLM means the same long generation running five times over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import boto3
from botocore.config import Config


def make_client(region: str | None = None, endpoint_url: str | None = None, read_timeout: float = 300) -> Any:
    """A sagemaker-runtime client: one attempt (no silent re-runs of a generation), a long read timeout.

    With `endpoint_url` (a local server) and neither AWS_ACCESS_KEY_ID nor AWS_PROFILE set, placeholder
    credentials are used: boto3 always signs, and the local server does not check the signature. (Looking
    credentials up instead would try the instance-metadata service, which a laptop does not have.)
    """
    config = Config(read_timeout=read_timeout, connect_timeout=10, retries={"total_max_attempts": 1})
    kwargs: dict[str, Any] = {"region_name": region, "endpoint_url": endpoint_url, "config": config}
    if endpoint_url:
        kwargs["region_name"] = region or "us-east-1"
        if not os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get("AWS_PROFILE"):
            kwargs.update(aws_access_key_id="x", aws_secret_access_key="x")
    return boto3.client("sagemaker-runtime", **kwargs)


def invoke_json(client: Any, endpoint: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """InvokeEndpoint with a JSON body; the decoded JSON response."""
    response = client.invoke_endpoint(
        EndpointName=endpoint, Body=json.dumps(body), ContentType="application/json", **kwargs
    )
    return json.loads(response["Body"].read())


def confidence(tokens: list[dict[str, Any]]) -> float:
    """exp(mean(log_prob)) over the generated tokens (LMI `details.tokens`)."""
    log_probs = [t["log_prob"] for t in tokens if t.get("log_prob") is not None]
    if not log_probs:
        raise ValueError("the response has no token log-probs")
    return math.exp(sum(log_probs) / len(log_probs))


def generate_with_confidence(
    client: Any, endpoint: str, prompt: str, max_new_tokens: int = 128, **parameters: Any
) -> tuple[str, float]:
    """Generate (greedy unless `parameters` say otherwise) with details; the text and its confidence."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True, **parameters}}
    result = invoke_json(client, endpoint, body)
    return result["generated_text"], confidence(result["details"]["tokens"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint-name", required=True)
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    parser.add_argument("--endpoint-url", help="e.g. http://127.0.0.1:8080 for a local llm-endpoint; "
                        "omit for the real SageMaker runtime")
    parser.add_argument("--prompt", default="Write a short paragraph about the benefits of regular exercise.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    client = make_client(args.region, args.endpoint_url)
    text, score = generate_with_confidence(client, args.endpoint_name, args.prompt, args.max_new_tokens)
    print(text)
    print(f"\nOverall confidence score in the generated text: {score:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
