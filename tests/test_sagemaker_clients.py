"""Libraries that call SageMaker endpoints, used as their users call them, against a real server on loopback:
LiteLLM's `sagemaker_chat/` and `sagemaker/` providers (pointed at the server with their own
`sagemaker_base_url` setting) and langchain-aws `SagemakerEndpoint` (with its `endpoint_url`).

Each streamed answer is checked against the same greedy request answered without streaming, so a stream whose
frames the library cannot decode (several events in one PayloadPart, or one part at the end) fails.
"""

from __future__ import annotations

import json
from typing import Any

import litellm
import pytest
import requests
from langchain_aws.llms import SagemakerEndpoint
from langchain_aws.llms.sagemaker_endpoint import LLMContentHandler

ENDPOINT = "llm-endpoint-test"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "What is Deep Learning?"
AWS = {"aws_access_key_id": "x", "aws_secret_access_key": "x", "aws_region_name": "us-east-1"}


def litellm_url(server: Any, stream: bool) -> str:
    """LiteLLM's `sagemaker_base_url` replaces the whole invocation URL, so it names the route to call."""
    route = "invocations-response-stream" if stream else "invocations"
    return f"{server.url}/endpoints/{ENDPOINT}/{route}"


def reference_chat(server: Any, max_tokens: int) -> str:
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]


def reference_lmi(server: Any, max_new_tokens: int) -> str:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False}}
    return requests.post(server.url + "/invocations", json=body, timeout=120).json()["generated_text"]


# ---- LiteLLM sagemaker_chat/ (the messages API) -------------------------------------------------------------


def test_litellm_sagemaker_chat(server) -> None:
    res = litellm.completion(
        model=f"sagemaker_chat/{ENDPOINT}", messages=QUESTION, temperature=0, max_tokens=20,
        sagemaker_base_url=litellm_url(server, stream=False), **AWS,
    )
    assert res.choices[0].message.content == reference_chat(server, 20)
    assert res.choices[0].finish_reason in ("stop", "length")
    assert res.usage.completion_tokens <= 20


def test_litellm_sagemaker_chat_streaming(server) -> None:
    chunks = list(litellm.completion(
        model=f"sagemaker_chat/{ENDPOINT}", messages=QUESTION, temperature=0, max_tokens=20, stream=True,
        sagemaker_base_url=litellm_url(server, stream=True), **AWS,
    ))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3  # token by token, not one chunk at the end
    assert "".join(texts) == reference_chat(server, 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


# ---- LiteLLM sagemaker/ (the LMI schema) ---------------------------------------------------------------------


def test_litellm_sagemaker(server) -> None:
    # no temperature: LMI's default is greedy (LiteLLM would raise 0 to 0.1, which samples)
    res = litellm.completion(
        model=f"sagemaker/{ENDPOINT}", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
        sagemaker_base_url=litellm_url(server, stream=False), **AWS,
    )
    text = res.choices[0].message.content
    assert text
    # LiteLLM sends the message text as `inputs` with max_new_tokens
    assert text == reference_lmi(server, 12)


def test_litellm_sagemaker_streaming(server) -> None:
    chunks = list(litellm.completion(
        model=f"sagemaker/{ENDPOINT}", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, stream=True,
        sagemaker_base_url=litellm_url(server, stream=True), **AWS,
    ))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3
    # LiteLLM's stream wrapper drops the whitespace a completion starts with
    assert "".join(texts) == reference_lmi(server, 12).lstrip()


# ---- langchain-aws SagemakerEndpoint ------------------------------------------------------------------------


class LmiStreamHandler(LLMContentHandler):
    """The content handler langchain-aws users write for an LMI endpoint: an LMI body in, and per streamed line
    the token's text out (non-streaming: `generated_text`)."""

    content_type = "application/json"
    accepts = "application/json"

    def transform_input(self, prompt: str, model_kwargs: dict) -> bytes:
        return json.dumps({"inputs": prompt, "parameters": model_kwargs}).encode()

    def transform_output(self, output: Any) -> str:
        if isinstance(output, bytes):  # a streamed line
            return json.loads(output)["token"]["text"]
        return json.loads(output.read())["generated_text"]


def langchain_llm(server: Any, streaming: bool) -> SagemakerEndpoint:
    return SagemakerEndpoint(
        endpoint_name=ENDPOINT, endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="x",
        aws_secret_access_key="x", content_handler=LmiStreamHandler(), streaming=streaming,
        model_kwargs={"max_new_tokens": 12, "do_sample": False},
    )


def test_langchain_sagemaker_endpoint_streaming(server) -> None:
    pieces = list(langchain_llm(server, streaming=True).stream(PROMPT))
    assert len(pieces) >= 3
    expected = reference_lmi(server, 12)
    assert "".join(pieces) == expected
    assert langchain_llm(server, streaming=False).invoke(PROMPT) == expected


@pytest.fixture(autouse=True)
def _no_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The libraries' settings alone point them at the local server: no AWS variables from the environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_REGION_NAME"):
        monkeypatch.delenv(name, raising=False)
