"""The load client's request formats and its one streaming HTTP request, apart from the processes it drives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from bench_workload import PROMPTS, RequestResult

if TYPE_CHECKING:
    from bench_targets import HttpTarget


# ---- request formats ------------------------------------------------------------------------------


@dataclass
class LineResult:
    """What one response line carried: `tokens` new output tokens, an in-band `error`, or the stream's end.
    `usage_tokens` is a server-reported total output count, when the format has one."""

    tokens: int = 0
    error: str | None = None
    done: bool = False
    usage_tokens: int | None = None


@dataclass(frozen=True)
class Api:
    """A server's request format: where to POST, the body for (prompt, N) and how to read a streamed line."""

    name: str
    path: str
    build: Callable[[str, int, str | None], dict[str, Any]]  # (prompt, max_new_tokens, model) -> JSON body
    parse_line: Callable[[str], LineResult]


def _lmi_body(prompt: str, max_new_tokens: int, model: str | None) -> dict[str, Any]:
    return {
        "inputs": prompt,
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True, "do_sample": False},
        "stream": True,
    }


def _lmi_line(line: str) -> LineResult:
    """LMI jsonlines: one `{"token": ...}` object per token; the last one also has `generated_text`."""
    obj = json.loads(line)
    if "error" in obj:
        return LineResult(error=f"in-band error: {obj['error']}")
    if "token" not in obj:
        return LineResult(error=f"unexpected line: {line[:200]}")
    return LineResult(tokens=1, done="generated_text" in obj)


def _sse_payload(line: str) -> str | None:
    """The JSON of an SSE `data:` line; None for blank lines, comments and other SSE fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _openai_line(line: str, key: Callable[[dict[str, Any]], str | None]) -> LineResult:
    payload = _sse_payload(line)
    if payload is None:
        return LineResult()
    if payload == "[DONE]":
        return LineResult(done=True)
    obj = json.loads(payload)
    if "error" in obj:
        return LineResult(error=f"in-band error: {obj['error']}")
    usage = obj.get("usage") or {}
    result = LineResult(usage_tokens=usage.get("completion_tokens"))
    for choice in obj.get("choices") or []:
        if key(choice):  # a chunk with text counts as one token (as vLLM's benchmark times chunks)
            result.tokens = 1
    return result


def _openai_completions_body(prompt: str, max_new_tokens: int, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt, "max_tokens": max_new_tokens, "min_tokens": max_new_tokens, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    return body


def _openai_chat_body(prompt: str, max_new_tokens: int, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens,
        "min_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    return body


APIS: dict[str, Api] = {
    # our server (and LMI): /invocations with the LMI body, jsonlines stream
    "lmi": Api("lmi", "/invocations", _lmi_body, _lmi_line),
    # OpenAI-style peers (vLLM, transformers serve, ...). NB chat prompts go through a chat template, so
    # their prompt lengths differ from the LMI runs; compare like with like.
    "openai-completions": Api(
        "openai-completions", "/v1/completions", _openai_completions_body,
        lambda line: _openai_line(line, lambda c: c.get("text")),
    ),
    # The same, also asking for each token's log-prob: the work our LMI stream always does (as LMI does).
    "openai-completions-logprobs": Api(
        "openai-completions-logprobs", "/v1/completions",
        lambda prompt, n, model: {**_openai_completions_body(prompt, n, model), "logprobs": 1},
        lambda line: _openai_line(line, lambda c: c.get("text")),
    ),
    "openai-chat": Api(
        "openai-chat", "/v1/chat/completions", _openai_chat_body,
        lambda line: _openai_line(line, lambda c: (c.get("delta") or {}).get("content")),
    ),
}


# ---- HTTP client ----------------------------------------------------------------------------------


async def one_request(session: aiohttp.ClientSession, target: HttpTarget, prompt_index: int,
                      max_new_tokens: int) -> RequestResult:
    """One streaming request. aiohttp, raw chunks rather than its line reader: on 2 cores the client's own CPU
    per token competes with the server under test (httpx's line reader alone took ~8% of the machine at
    c=16). Lines that arrive together are counted as one arrival of several tokens."""
    api = target.api
    result = RequestResult(prompt_index)
    usage_tokens: int | None = None
    try:
        body = api.build(PROMPTS[prompt_index], max_new_tokens, target.model)
        async with session.post(target.url + api.path, json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                return result.fail(f"HTTP {response.status}: {text[:200]}")
            pending = b""
            async for data in response.content.iter_any():  # whatever has arrived: usually one line
                *lines, pending = (pending + data).split(b"\n")
                tokens, done = 0, False
                for raw in lines:
                    line = raw.decode().strip()
                    if not line:
                        continue
                    parsed = api.parse_line(line)
                    if parsed.error:
                        return result.fail(parsed.error)
                    if parsed.usage_tokens is not None:
                        usage_tokens = parsed.usage_tokens
                    tokens += parsed.tokens
                    done = done or parsed.done
                if tokens:
                    result.arrived(tokens)
                if done:
                    break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return result.fail(f"{type(exc).__name__}: {exc}")
    return result.end(max_new_tokens, usage_tokens)
