"""Shared fixtures: the real demo model and real `llm-endpoint serve` processes on loopback.

The conformance tests take the `server` fixture, which is parametrized over the backends under test
(`LLM_ENDPOINT_TEST_BACKENDS`, default: every CPU backend whose engine is installed), so one suite holds
every engine to the same contract.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from llm_endpoint.backends.config import ServingConfig

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 600
_MAX_LIVE_SERVERS = 3  # each holds a model in memory; the machine has 24 GiB
# Conformance servers compare against transformers in fp32, so every engine runs fp32 (all three default to
# bf16/fp16 on CPUs with native bf16); vLLM without graph compilation keeps start-up at ~30 s instead of ~2 min.
BACKEND_DEFAULTS: dict[str, dict[str, str]] = {
    "scheduler": {"dtype": "fp32"},
    "disable": {"dtype": "fp32"},
    "vllm": {"dtype": "fp32", "enforce_eager": "true"},
    "openvino": {"dtype": "fp32"},
}
# Engines that report only the chosen token's log-prob refuse top_n_tokens / top_logprobs with a 424.
NO_TOP_TOKENS = {"openvino"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backends_under_test() -> list[str]:
    configured = os.environ.get("LLM_ENDPOINT_TEST_BACKENDS")
    if configured:
        return [b.strip() for b in configured.split(",") if b.strip()]
    found = ["scheduler"]
    if _installed("vllm"):
        found.append("vllm")
    if _installed("openvino_genai"):
        found.append("openvino")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    backend: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    model_dir: Path, options: dict[str, str], log_dir: Path, backend: str, env_extra: dict[str, str] | None = None
) -> RunningServer:
    """Start `llm-endpoint serve` with OPTION_* settings (plus any other variables, e.g. SERVING_*) and wait
    until /ping says Healthy."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))}
    env.update({f"OPTION_{k.upper()}": str(v) for k, v in options.items()})
    env.update(env_extra or {})
    env["OPTION_ROLLING_BATCH"] = backend
    log_path = log_dir / f"server-{backend}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_endpoint.server.cli", "serve", "--model-dir", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", backend, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/ping", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")


def make_config(**fields: object) -> ServingConfig:
    """A ServingConfig with `fields` set and the cache directory and converter the loader finds here."""
    from llm_endpoint.server.config import load_config

    found = load_config(None, {**os.environ, "OPTION_MODEL_ID": "unused"})
    return ServingConfig(**{"cache_dir": found.cache_dir, "optimum_cli": found.optimum_cli, **fields})


@pytest.fixture(scope="session")
def model_dir() -> Path:
    configured = os.environ.get("LLM_ENDPOINT_TEST_MODEL_DIR")
    if configured:
        return Path(configured)
    from llm_endpoint.server.config import cache_root
    from llm_endpoint.server.demo_model import prepare_demo_model

    return prepare_demo_model(cache_root(os.environ))


class ServerPool:
    """Servers keyed by (backend, options), started on first use and reused; the oldest is stopped when
    too many are alive at once."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self._live: dict[tuple, RunningServer] = {}

    def get(self, backend: str, **options: str) -> RunningServer:
        options = {**BACKEND_DEFAULTS.get(backend, {}), **options}
        key = (backend, tuple(sorted((k, str(v)) for k, v in options.items())))
        server = self._live.get(key)
        if server is not None and server.process.poll() is None:
            self._live[key] = self._live.pop(key)  # most recently used last
            return server
        while len(self._live) >= _MAX_LIVE_SERVERS:
            oldest = next(iter(self._live))
            self._live.pop(oldest).stop()
        server = start_server(self.model_dir, options, self.log_dir, backend)
        self._live[key] = server
        return server

    def stop_all(self) -> None:
        for server in self._live.values():
            server.stop()
        self._live.clear()


@pytest.fixture(scope="session")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(model_dir, tmp_path_factory.mktemp("server-logs"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session", params=backends_under_test())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(servers: ServerPool, backend: str) -> RunningServer:
    """A server with default options for the backend under test."""
    return servers.get(backend)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def hf_model(model_dir: Path):
    """The reference: transformers' own model in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()
