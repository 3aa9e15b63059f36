"""`llm-endpoint serve` start-up as a container meets it: the port is bound before any download, /ping says
503 meanwhile, and every start-up failure is one line on stderr and exit code 2 (LMI exits when loading fails)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port


class _StalledIndex(http.server.ThreadingHTTPServer):
    """A package index that holds every request until `release` is set, then answers 404: the network is gone."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.requested = threading.Event()
        stalled = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                stalled.requested.set()
                stalled.release.wait(60)
                self.send_error(404)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def stalled_index() -> Iterator[_StalledIndex]:
    index = _StalledIndex()
    thread = threading.Thread(target=index.serve_forever, daemon=True)
    thread.start()
    yield index
    index.release.set()
    index.shutdown()


def _serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ours = ("OPTION_", "SERVING_", "HF_MODEL", "PIP_")  # PIP_*: no local wheel directory may stand in for the index
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_endpoint.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def _ping_until_answered(process: subprocess.Popen, url: str, timeout: float = 120) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            return requests.get(url + "/ping", timeout=5)
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError("the port was never bound")


def _one_error_line(process: subprocess.Popen) -> str:
    """The process's single `llm-endpoint: error:` line, after checking it exited 2 without a traceback."""
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("llm-endpoint: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_no_model_and_no_network_binds_first_says_pending_then_one_line_and_exit_2(
    tmp_path: Path, stalled_index: _StalledIndex
) -> None:
    index_url = f"http://127.0.0.1:{stalled_index.server_address[1]}/simple"
    env = {"LLM_ENDPOINT_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": index_url, "PIP_RETRIES": "0",
           "PIP_CONFIG_FILE": os.devnull}  # devnull: pip reads no configuration file (find-links, extra indexes)
    process, url = _serve([], env)
    try:
        ping = _ping_until_answered(process, url)
        assert stalled_index.requested.wait(60), "the demo model download never started"
        # bound and answering while the download is still in flight
        assert ping.status_code == 503 and list(ping.json().values()) == [{"status": "PENDING"}]
        invocation = requests.post(url + "/invocations", json={"inputs": "hi"}, timeout=5)
        assert invocation.status_code == 503 and "not ready" in invocation.json()["error"]
    finally:
        stalled_index.release.set()
    line = _one_error_line(process)
    assert "demo model" in line and "--model-dir" in line, line


def test_a_model_that_fails_to_load_ends_the_server_with_one_line_and_exit_2(model_dir: Path, tmp_path: Path) -> None:
    """Tokenizer and config are fine (the server gets as far as loading weights), the weights are not."""
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    process, url = _serve(["--model-dir", str(broken)], {"OPTION_ROLLING_BATCH": "scheduler"})
    line = _one_error_line(process)
    assert "failed to load: SafetensorError" in line, line
