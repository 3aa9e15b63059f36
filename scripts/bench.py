#!/usr/bin/env python
"""Serving benchmark: drive `llm-endpoint serve` over HTTP and compare engine configurations in one run.

For each config (an `option.rolling_batch` value: `scheduler`, `disable`, later `vllm`, `openvino`, ...) the
script starts its own server on 127.0.0.1 (`python -m server.cli serve` with OPTION_ROLLING_BATCH=<config>;
compute threads are the server's own default unless --threads is given), waits for /ping, warms it up, and then for each concurrency level
runs C client tasks (one process, asyncio + httpx), each sending R streaming requests back to back. The server
is stopped before the next config starts, so configs never compete for the CPU. With --interleave all servers
are started first (an idle server uses no CPU) and each level runs on every config back to back, so a change
in background load over the run (a shared machine) does not land on one config only.

Every request is the LMI body

    {"inputs": prompt, "parameters": {"max_new_tokens": N, "ignore_eos_token": true, "do_sample": false},
     "stream": true}

so each one generates exactly N tokens (one jsonlines line per token). Prompts come from a fixed set of 16
English prompts (about 10-200 tokens), cycled deterministically: request k of a level (k = j*C + i for
client i's j-th request) uses prompt k mod 16. With the default R = ceil(16 / C), every level sends each
prompt exactly once, so levels and configs see the same work.

A level stops starting new requests after --max-level-seconds (default 90 s; in-flight ones finish), so a
run stays bounded on a busy machine; the table then shows "requests: k of n". The default run (2 configs x
3 levels x 16 requests x 64 tokens, plus HF) takes about 6-7 minutes on a quiet 2-core machine; on a busy one
each of the 7 timed blocks is cut at 90 s plus the requests still in flight.

Per request: TTFT (request sent -> first token line), ITL (gaps between token lines), end-to-end latency.
Per level: output tokens/s = all output tokens / wall time of the level, TTFT and ITL p50/p99
(percentiles as in vLLM's `benchmarks/serve.py`: numpy's linear interpolation over all requests' values,
ITL pooled over all gaps), request and error counts (an error: HTTP status != 200, an in-band error line,
a transport failure, or a token count != N), and the CPU seconds the client and the server used.

`--hf-generate` also times transformers' own `model.generate` in this process after the servers are stopped
(with --interleave: right after the c=1 levels, servers idle): fp32, greedy, torch's default threads unless
--threads, same prompts tokenized the way the server tokenizes `inputs` (add_special_tokens=True),
max_new_tokens = min_new_tokens = N, one prompt at a time, each prompt once; TTFT/ITL from a streamer.

Usage (from the repository root):

    .venv/bin/python scripts/bench.py --hf-generate                 # scheduler vs disable, c=1,4,16
    .venv/bin/python scripts/bench.py --hf-generate --interleave    # same, fairer on a noisy machine
    .venv/bin/python scripts/bench.py --configs scheduler --concurrency 1,2,4,8,16 --json out.json
    .venv/bin/python scripts/bench.py --server-option dtype=bf16   # any OPTION_<KEY> for the servers
    .venv/bin/python scripts/bench.py --hf-generate --threads 1    # OMP_NUM_THREADS=1 servers, 1-thread HF
    .venv/bin/python scripts/bench.py --configs scheduler --api openai-chat   # our /v1/chat/completions
    .venv/bin/python scripts/bench.py --configs none --peer vllm=http://127.0.0.1:8000 \\
        --peer-api openai-completions --peer-model my-model        # a server someone else started

Output: one markdown table (config | concurrency | output tok/s | TTFT p50/p99 | ITL p50/p99 | requests |
errors), a CPU table, ratio lines (scheduler/disable at each concurrency; scalability c_max/c1 per config;
scheduler@1 / hf-generate), and with --json the raw numbers. Server logs go to --log-dir (a temp dir by
default) and are kept.

A new request format (a "peer" server such as vLLM's OpenAI /v1/completions) is an `Api`: a request
builder plus a response-line parser; see `APIS`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 600

# A fixed, varied prompt set: real English, roughly 10 to 200 tokens each (SmolLM2 tokenizer).
PROMPTS: list[str] = [
    "What is the capital of France, and what river runs through it?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "Explain in simple terms why the sky is blue during the day and red at sunset.",
    "List three practical tips for someone who wants to start running regularly, and explain why each one "
    "helps a beginner stay motivated.",
    "You are a helpful assistant. A customer writes: 'I ordered a pair of shoes two weeks ago and they still "
    "have not arrived. The tracking page has not changed for six days.' Write a short, polite reply.",
    "Summarize the following paragraph in one sentence. Photosynthesis is the process by which green plants, "
    "algae and some bacteria convert light energy into chemical energy. Using sunlight, water and carbon "
    "dioxide, they produce glucose and release oxygen as a by-product. This process is the foundation of "
    "most food chains on Earth.",
    "Translate the following sentence into French: The library on the corner of our street opens at nine in "
    "the morning and closes at six in the evening, except on Sundays.",
    "Write a Python function that takes a list of integers and returns a new list containing only the even "
    "numbers, in the same order. Include a docstring and one example of how to call it.",
    "A train leaves the station at 3 pm travelling at 80 kilometres per hour. A second train leaves the same "
    "station at 4 pm on a parallel track travelling at 100 kilometres per hour in the same direction. At "
    "what time does the second train catch up with the first? Show your reasoning step by step.",
    "Read the short story opening below and continue it for a few sentences, keeping the same tone.\n\n"
    "The lighthouse keeper had not seen another person for forty-one days. Every evening he climbed the "
    "spiral staircase, counted the steps out loud, and lit the lamp. The sea was calm that night, too calm, "
    "and when he looked out over the water he noticed a small boat drifting towards the rocks with no one "
    "at the oars.",
    "Compare renewable and non-renewable energy sources. Cover at least the following points: how each type "
    "is produced, their environmental impact, their cost over time, and how reliable they are for a "
    "national power grid. Solar, wind, hydroelectric, coal, natural gas and nuclear power are all relevant. "
    "Keep the answer balanced and end with a short conclusion about which mix of sources seems most "
    "sensible for a medium-sized country with a long coastline and a cold climate.",
    "Give me a recipe for a simple vegetable soup.",
    "The meeting notes below are messy. Rewrite them as a clean list of decisions and action items, each "
    "with an owner.\n\nnotes: talked about q3 launch, maria says design is late by a week maybe two. "
    "decided to move launch to october 15. tom will update the roadmap and tell sales. budget for ads "
    "approved but only half of what we asked, priya to redo the plan with the smaller budget by friday. "
    "someone needs to check the legal review status, nobody volunteered, alex said he would ask. next "
    "meeting tuesday. also: customer support wants a faq page before launch, "
    "jenny offered to draft it but needs the final pricing first, pricing is still waiting on finance. "
    "the beta testers reported two crashes on older android phones, dev team to investigate, no owner yet.",
    "Why do cats purr, and do big cats such as lions purr too?",
    "Explain the difference between a process and a thread in an operating system. Describe how memory is "
    "shared or isolated in each case, what happens when one of them crashes, and give one example of a "
    "program that benefits from using several processes and one that benefits from using several threads. "
    "Finally, mention how the global interpreter lock affects threads in CPython and what programmers "
    "usually do about it when they need to use more than one CPU core for heavy computation.",
    "You are a travel guide. A family with two children aged eight and twelve is visiting Rome for three "
    "days in early spring. They enjoy history and good food but get tired after long walks, and the "
    "younger child is afraid of crowds. They are staying in a hotel near Termini station and do not want to "
    "rent a car. Plan their three days: for each day suggest a morning activity, a lunch idea, an afternoon "
    "activity and an evening plan, and explain briefly why each choice suits this family. Mention how they "
    "should get around, what they should book in advance, and one thing to avoid. Keep the tone friendly "
    "and the plan realistic, with enough breaks for the children. Finally, add a short list of five Italian "
    "phrases that would be useful for the children to learn before the trip, such as how to say hello, "
    "thank you and please, how to order an ice cream, and how to ask where the toilets are, with a simple "
    "pronunciation guide for each one so that an eight-year-old could read it aloud without help.",
]


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
    "openai-chat": Api(
        "openai-chat", "/v1/chat/completions", _openai_chat_body,
        lambda line: _openai_line(line, lambda c: (c.get("delta") or {}).get("content")),
    ),
}


# ---- servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (from /proc/stat), to show how much of the CPU
    something other than this benchmark took during a level (the machine may be shared)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ManagedServer:
    """`llm-endpoint serve` as a subprocess on 127.0.0.1, with OPTION_* settings; logs to a file."""

    def __init__(self, config: str, model_dir: Path | None, options: dict[str, str], log_dir: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{config}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))}
        env.update({f"OPTION_{k.upper()}": v for k, v in options.items()})
        env["OPTION_ROLLING_BATCH"] = config
        env.update(extra_env or {})
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if model_dir is not None:
            cmd += ["--model-dir", str(model_dir)]
        self.command = cmd
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.config} server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ping", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.config} server not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---- client ---------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    prompt_index: int
    ok: bool = False
    error: str | None = None
    tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None


async def one_request(client: httpx.AsyncClient, url: str, api: Api, prompt_index: int, prompt: str,
                      max_new_tokens: int, model: str | None) -> RequestResult:
    result = RequestResult(prompt_index)
    body = api.build(prompt, max_new_tokens, model)
    usage_tokens: int | None = None
    sent = time.perf_counter()
    last = sent
    try:
        async with client.stream("POST", url + api.path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                parsed = api.parse_line(line)
                if parsed.error:
                    result.error = parsed.error
                    return result
                if parsed.usage_tokens is not None:
                    usage_tokens = parsed.usage_tokens
                if parsed.tokens:
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.tokens += parsed.tokens
                if parsed.done:
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - sent
    if usage_tokens is not None:
        result.tokens = usage_tokens
    if result.tokens != max_new_tokens:
        result.error = f"generated {result.tokens} tokens, expected {max_new_tokens}"
        return result
    result.ok = True
    return result


def percentile(values: list[float], q: float) -> float | None:
    """vLLM's definition: numpy's default (linear interpolation) percentile."""
    return float(np.percentile(values, q)) if values else None


@dataclass
class LevelResult:
    config: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    client_cpu_s: float
    server_cpu_s: float | None
    other_cpu_s: float | None = None  # CPU used by everything else on the machine during the level
    planned_requests: int | None = None  # more than `requests` when --max-level-seconds cut the level short
    error_samples: list[str] = field(default_factory=list)
    per_request: list[dict[str, Any]] = field(default_factory=list)  # for --json: prompt, ttft, e2e, error


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def summarize(config: str, concurrency: int, results: list[RequestResult], wall: float, client_cpu: float,
              server_cpu: float | None) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error or "?" for r in results if not r.ok]
    return LevelResult(
        config=config, concurrency=concurrency, requests=len(results), errors=len(errors), wall_s=wall,
        output_tokens=tokens, output_tok_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        itl_p50_ms=_ms(percentile(itls, 50)), itl_p99_ms=_ms(percentile(itls, 99)),
        e2e_p50_ms=_ms(percentile(e2es, 50)), client_cpu_s=client_cpu, server_cpu_s=server_cpu,
        error_samples=sorted(set(errors))[:5],
        per_request=[{"prompt": r.prompt_index, "tokens": r.tokens, "ttft_ms": _ms(r.ttft), "e2e_ms": _ms(r.e2e),
                      "itl_max_ms": _ms(max(r.itl)) if r.itl else None, "error": r.error} for r in results],
    )


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(url: str, api: Api, config: str, concurrency: int, requests_per_client: int,
                    max_new_tokens: int, model: str | None, server_pid: int | None,
                    max_seconds: float | None = None) -> LevelResult:
    """C workers, R requests each; past `max_seconds` no new request starts (those in flight finish)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(connect=30.0, read=900.0, write=30.0, pool=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker(i: int) -> list[RequestResult]:
            out = []
            for j in range(requests_per_client):
                if max_seconds and time.perf_counter() - start > max_seconds:
                    break
                k = j * concurrency + i
                index = k % len(PROMPTS)
                out.append(await one_request(client, url, api, index, PROMPTS[index], max_new_tokens, model))
            return out

        cpu0, srv0 = client_cpu_seconds(), process_cpu_seconds(server_pid) if server_pid else None
        sys0 = system_busy_cpu_seconds()
        start = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
        cpu1, srv1 = client_cpu_seconds(), process_cpu_seconds(server_pid) if server_pid else None
        sys1 = system_busy_cpu_seconds()
    results = [r for rs in per_worker for r in rs]
    server_cpu = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    level = summarize(config, concurrency, results, wall, cpu1 - cpu0, server_cpu)
    level.other_cpu_s = _other_cpu(sys0, sys1, (cpu1 - cpu0) + (server_cpu or 0.0))
    level.planned_requests = concurrency * requests_per_client
    return level


def _other_cpu(sys0: float | None, sys1: float | None, ours: float) -> float | None:
    return None if sys0 is None or sys1 is None else max(0.0, sys1 - sys0 - ours)


async def warm_up(url: str, api: Api, model: str | None, concurrency: int) -> list[str]:
    """Untimed: the shortest and the longest prompt alone, then a few at once (first-call costs)."""
    timeout = httpx.Timeout(connect=30.0, read=900.0, write=30.0, pool=30.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        by_len = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
        results = [await one_request(client, url, api, i, PROMPTS[i], 8, model) for i in (by_len[0], by_len[-1])]
        results += await asyncio.gather(*(one_request(client, url, api, i, PROMPTS[i], 8, model)
                                          for i in range(concurrency)))
    return [r.error for r in results if not r.ok and r.error]


def requests_per_client_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests_per_client:
        return args.requests_per_client
    return max(1, math.ceil(args.requests_per_level / concurrency))


@dataclass
class Target:
    """A server under test: one we started (`server` set) or a peer someone else started."""

    name: str
    url: str
    api: Api
    model: str | None = None  # `model` field for OpenAI-style bodies
    server: ManagedServer | None = None

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server else None


def warm_target(target: Target, args: argparse.Namespace) -> None:
    errors = asyncio.run(warm_up(target.url, target.api, target.model, min(4, max(args.concurrency))))
    if errors:
        print(f"  {target.name} warm-up errors: {errors[:3]}", flush=True)


def bench_level(target: Target, concurrency: int, args: argparse.Namespace) -> LevelResult:
    r = requests_per_client_for(concurrency, args)
    level = asyncio.run(run_level(target.url, target.api, target.name, concurrency, r, args.max_new_tokens,
                                  target.model, target.pid, args.max_level_seconds))
    cut = f" (of {level.planned_requests}: time cap)" if level.planned_requests != level.requests else ""
    print(f"  {target.name} c={concurrency}: {level.requests} req{cut}, {level.output_tok_s:.1f} tok/s, "
          f"wall {level.wall_s:.1f} s, TTFT p50 {_fmt(level.ttft_p50_ms)} ms, ITL p50 {_fmt(level.itl_p50_ms)} ms, "
          f"errors {level.errors}, client CPU {level.client_cpu_s:.1f} s, "
          f"server CPU {_fmt(level.server_cpu_s, 1)} s, other processes {_fmt(level.other_cpu_s, 1)} s",
          flush=True)
    for err in level.error_samples:
        print(f"    error: {err}", flush=True)
    return level


def start_target(config: str, model_dir: Path | None, options: dict[str, str], log_dir: Path, api: Api,
                 meta: list[dict[str, Any]], extra_env: dict[str, str]) -> Target:
    server = ManagedServer(config, model_dir, options, log_dir, extra_env)
    try:
        startup = server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    print(f"[{config}] server pid {server.pid} healthy after {startup:.1f} s ({server.url})", flush=True)
    meta.append({"config": config, "startup_s": startup, "log": str(server.log_path), "command": server.command})
    return Target(config, server.url, api, None, server)


# ---- transformers' own generate -------------------------------------------------------------------


def bench_hf_generate(model_dir: Path, max_new_tokens: int, max_seconds: float | None = None,
                      threads: int | None = None) -> tuple[LevelResult, dict[str, Any]]:
    """transformers `generate`, fp32, greedy, one prompt at a time, each prompt once; timed like a level."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Records when each new token is handed out (`put` is first called with the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._seen_prompt = False

        def put(self, value: Any) -> None:
            if not self._seen_prompt:
                self._seen_prompt = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    encoded = [tokenizer(p, add_special_tokens=True, return_tensors="pt") for p in PROMPTS]
    gen_kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                      else tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(**encoded[-1], **{**gen_kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        results = []
        cpu0, sys0 = client_cpu_seconds(), system_busy_cpu_seconds()
        start = time.perf_counter()
        for i, enc in enumerate(encoded):
            if max_seconds and time.perf_counter() - start > max_seconds:
                break
            streamer = TimingStreamer()
            sent = time.perf_counter()
            out = model.generate(**enc, **gen_kwargs, streamer=streamer)
            done = time.perf_counter()
            n = out.shape[1] - enc["input_ids"].shape[1]
            r = RequestResult(i, tokens=n, e2e=done - sent)
            if streamer.times:
                r.ttft = streamer.times[0] - sent
                r.itl = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
            r.ok = n == max_new_tokens
            r.error = None if r.ok else f"generated {n} tokens, expected {max_new_tokens}"
            results.append(r)
        wall = time.perf_counter() - start
        cpu, sys1 = client_cpu_seconds() - cpu0, system_busy_cpu_seconds()
    level = summarize("hf-generate", 1, results, wall, cpu, None)
    level.other_cpu_s = _other_cpu(sys0, sys1, cpu)
    level.planned_requests = len(encoded)
    lengths = [int(e["input_ids"].shape[1]) for e in encoded]
    info = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
                              "per_prompt": lengths}}
    return level, info


def prompt_token_lengths(model_dir: Path | None) -> list[int] | None:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:
        return None
    return [len(tok(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]


# ---- report ---------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(levels: list[LevelResult]) -> str:
    rows = ["| config | concurrency | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | requests | errors |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        rows.append(
            f"| {lv.config} | {lv.concurrency} | {lv.output_tok_s:.1f} | "
            f"{_fmt(lv.ttft_p50_ms)} / {_fmt(lv.ttft_p99_ms)} | {_fmt(lv.itl_p50_ms, 1)} / {_fmt(lv.itl_p99_ms, 1)} | "
            f"{lv.requests}{'' if lv.planned_requests in (None, lv.requests) else f' of {lv.planned_requests}'} | "
            f"{lv.errors} |"
        )
    return "\n".join(rows)


def cpu_table(levels: list[LevelResult]) -> str:
    rows = ["| config | concurrency | wall (s) | e2e p50 (s) | client CPU (s, % of wall) | server CPU (s, cores) "
            "| other processes' CPU (s, cores) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        server = "-" if lv.server_cpu_s is None else f"{lv.server_cpu_s:.1f} ({lv.server_cpu_s / lv.wall_s:.2f})"
        e2e = "-" if lv.e2e_p50_ms is None else f"{lv.e2e_p50_ms / 1000:.2f}"
        other = "-" if lv.other_cpu_s is None else f"{lv.other_cpu_s:.1f} ({lv.other_cpu_s / lv.wall_s:.2f})"
        rows.append(f"| {lv.config} | {lv.concurrency} | {lv.wall_s:.1f} | {e2e} | "
                    f"{lv.client_cpu_s:.1f} ({100 * lv.client_cpu_s / lv.wall_s:.0f}%) | {server} | {other} |")
    return "\n".join(rows)


def ratio_lines(levels: list[LevelResult], hf: LevelResult | None) -> list[tuple[str, float]]:
    by = {(lv.config, lv.concurrency): lv for lv in levels}
    configs = list(dict.fromkeys(lv.config for lv in levels))
    concurrencies = sorted({lv.concurrency for lv in levels})
    out: list[tuple[str, float]] = []

    def tps(config: str, c: int) -> float | None:
        lv = by.get((config, c))
        return lv.output_tok_s if lv and lv.output_tok_s > 0 else None

    if "scheduler" in configs and "disable" in configs:
        for c in concurrencies:
            a, b = tps("scheduler", c), tps("disable", c)
            if a and b:
                out.append((f"scheduler / disable @ c={c} (output tok/s)", a / b))
    lo = min(concurrencies, default=1)
    for config in configs:
        for c in concurrencies:
            if c == lo:
                continue
            a, b = tps(config, c), tps(config, lo)
            if a and b:
                out.append((f"{config} @ c={c} / {config} @ c={lo}", a / b))
    if "scheduler" in configs and "disable" in configs:
        base = tps("disable", lo)
        for c in concurrencies:
            a = tps("scheduler", c)
            if a and base and c != lo:
                out.append((f"scheduler @ c={c} / disable @ c={lo} (one-at-a-time baseline)", a / base))
    if hf is not None and hf.output_tok_s > 0:
        for config in configs:
            a = tps(config, 1)
            if a:
                out.append((f"{config} @ c=1 / hf-generate", a / hf.output_tok_s))
    return out


# ---- main -----------------------------------------------------------------------------------------


def _csv_ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return values


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="model directory (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--configs", type=_csv, default=["scheduler", "disable"],
                   help="rolling_batch values to start servers for, in order (default: scheduler,disable)")
    p.add_argument("--concurrency", type=_csv_ints, default=[1, 4, 16], help="default: 1,4,16")
    p.add_argument("--requests-per-level", type=int, default=len(PROMPTS),
                   help="requests per concurrency level; R = ceil(this / C) per client (default: %(default)s, "
                        "i.e. every prompt once)")
    p.add_argument("--requests-per-client", type=int, help="R, overriding --requests-per-level")
    p.add_argument("--max-new-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    p.add_argument("--api", choices=sorted(APIS), default="lmi", help="request format for managed servers")
    p.add_argument("--server-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra OPTION_<KEY>=VALUE for every managed server (repeatable), e.g. dtype=bf16")
    p.add_argument("--server-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every managed server (repeatable), e.g. OMP_NUM_THREADS=1")
    p.add_argument("--threads", type=int,
                   help="torch/OpenMP threads for the servers (OMP_NUM_THREADS) and for --hf-generate "
                        "(torch.set_num_threads); default: torch's own default (all cores)")
    p.add_argument("--max-level-seconds", type=float, default=90.0,
                   help="no new request starts after this long in one level (in-flight ones finish), so a "
                        "run stays bounded on a slow or busy machine; 0 = no cap (default: %(default)s)")
    p.add_argument("--peer", type=_key_value, action="append", default=[], metavar="NAME=URL",
                   help="also benchmark an already running server at URL (repeatable)")
    p.add_argument("--peer-api", choices=sorted(APIS), default="openai-completions")
    p.add_argument("--peer-model", help="`model` field for OpenAI-style peers")
    p.add_argument("--hf-generate", action="store_true",
                   help="also time transformers' model.generate on the same prompts (after the servers stop)")
    p.add_argument("--interleave", action="store_true",
                   help="start all servers first and run each concurrency level on every config back to back "
                        "(and HF after c=1), instead of one server at a time; fairer on a shared, noisy machine")
    p.add_argument("--log-dir", type=Path, help="where server logs go (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    return p.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the `finally` blocks that stop servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    run_started = time.monotonic()
    model_dir = args.model_dir
    if model_dir is None and (args.configs or args.hf_generate):
        sys.path.insert(0, str(REPO))
        from server.demo_model import prepare_demo_model

        model_dir = prepare_demo_model()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="llm-endpoint-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    options = dict(args.server_option)
    server_env = dict(args.server_env)
    if args.threads:
        server_env.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"model: {model_dir}\nconfigs: {args.configs} peers: {[n for n, _ in args.peer]} "
          f"concurrency: {args.concurrency} max_new_tokens: {args.max_new_tokens} "
          f"server options: {options or '-'} server env: {server_env or '-'}\nserver logs: {log_dir}\n"
          f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    levels: list[LevelResult] = []
    servers_meta: list[dict[str, Any]] = []
    peers = [Target(name, url.rstrip("/"), APIS[args.peer_api], args.peer_model) for name, url in args.peer]
    hf_level, hf_info = None, {}

    def run_hf() -> None:
        nonlocal hf_level, hf_info
        print("[hf-generate] transformers model.generate, fp32, greedy, one at a time", flush=True)
        try:
            hf_level, hf_info = bench_hf_generate(model_dir, args.max_new_tokens, args.max_level_seconds,
                                                  args.threads)
        except Exception as exc:  # keep the server results of a long run
            print(f"  hf-generate failed: {type(exc).__name__}: {exc}", flush=True)
            hf_info = {"error": f"{type(exc).__name__}: {exc}"}
            return
        print(f"  hf-generate: {hf_level.output_tok_s:.1f} tok/s, TTFT p50 {_fmt(hf_level.ttft_p50_ms)} ms, "
              f"ITL p50 {_fmt(hf_level.itl_p50_ms, 1)} ms, other processes {_fmt(hf_level.other_cpu_s, 1)} s",
              flush=True)

    if not args.interleave:
        # One server at a time: start, warm up, every concurrency level, stop; then peers; then HF.
        for config in args.configs:
            target = start_target(config, model_dir, options, log_dir, APIS[args.api], servers_meta, server_env)
            try:
                warm_target(target, args)
                levels += [bench_level(target, c, args) for c in args.concurrency]
            finally:
                target.server.stop()
        for target in peers:
            print(f"[{target.name}] peer at {target.url}", flush=True)
            warm_target(target, args)
            levels += [bench_level(target, c, args) for c in args.concurrency]
        if args.hf_generate:
            run_hf()
    else:
        # All servers up at once (idle ones cost memory, not CPU); each concurrency level runs every target
        # back to back, and HF right after the c=1 levels, so slow drifts in background load hit all alike.
        targets: list[Target] = []
        try:
            for config in args.configs:
                targets.append(start_target(config, model_dir, options, log_dir, APIS[args.api], servers_meta, server_env))
            targets += peers
            for target in targets:
                warm_target(target, args)
            for i, c in enumerate(args.concurrency):
                levels += [bench_level(target, c, args) for target in targets]
                if args.hf_generate and i == 0:
                    run_hf()
        finally:
            for target in targets:
                if target.server:
                    target.server.stop()
    lengths = hf_info.get("prompt_tokens", {}).get("per_prompt") or (
        prompt_token_lengths(model_dir) if model_dir else None)

    order = list(dict.fromkeys(lv.config for lv in levels))
    levels.sort(key=lambda lv: (order.index(lv.config), lv.concurrency))
    all_levels = levels + ([hf_level] if hf_level else [])
    ratios = ratio_lines(levels, hf_level)
    total = time.monotonic() - run_started
    print()
    print(f"## Results: {args.max_new_tokens} output tokens per request, greedy, ignore_eos; "
          f"{args.requests_per_level if not args.requests_per_client else 'R x C'} requests per level")
    if lengths:
        print(f"prompt tokens: {len(lengths)} prompts, min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, "
              f"max {max(lengths)}")
    print()
    print(markdown_table(all_levels))
    print()
    print(cpu_table(all_levels))
    print()
    for label, value in ratios:
        print(f"- {label}: {value:.2f}x")
    print(f"\nwall time of the whole run: {total:.0f} s")
    print("command: " + " ".join([Path(sys.executable).name, "scripts/bench.py"] + (argv if argv is not None
                                                                                     else sys.argv[1:])))

    if args.json:
        doc = {
            "argv": sys.argv, "model_dir": str(model_dir) if model_dir else None,
            "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "prompt_tokens": lengths, "servers": servers_meta, "server_options": options,
            "server_env": server_env, "threads": args.threads, "interleave": args.interleave,
            "levels": [asdict(lv) for lv in all_levels], "hf_generate": hf_info or None,
            "ratios": dict(ratios), "wall_s": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"JSON: {args.json}")
    return 0 if all(lv.errors == 0 for lv in all_levels) else 1


if __name__ == "__main__":
    sys.exit(main())
