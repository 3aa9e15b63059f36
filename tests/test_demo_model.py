"""`llm-endpoint demo-model`: prepares the demo model once, idempotently, even when started twice at once."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

NOBODY = 65534


def _run_demo_model(cache: Path) -> subprocess.Popen:
    """`llm-endpoint demo-model` under umask 077, the strictest a user may have: the files must still be shared."""
    env = {**os.environ, "LLM_ENDPOINT_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "llm_endpoint.server.cli", "demo-model"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=0o077,
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under /tmp that other uids can reach (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="demo-model-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _load(model_dir: Path) -> None:
    """What serving reads: locate the model, its tokenizer and config, every weight."""
    from safetensors import safe_open

    from llm_endpoint.backends.model_files import load_tokenizer, locate_model, model_max_length

    files = locate_model(str(model_dir))
    load_tokenizer(files)
    model_max_length(files)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        for name in weights.keys():
            weights.get_tensor(name)


def _load_as_nobody(model_dir: Path) -> str:
    """`_load` in a forked child that has become uid 65534: "ok" or the error.

    Forked, not a new interpreter: this machine's Python lives under /root, which uid 65534 cannot read, so the
    child loads once as root first, importing every module it needs, before it drops to uid 65534.
    """
    context = multiprocessing.get_context("fork")
    result = context.Queue()

    def child() -> None:
        try:
            _load(model_dir)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            _load(model_dir)
            result.put("ok")
        except Exception as exc:
            result.put(f"{type(exc).__name__}: {exc}")

    process = context.Process(target=child)
    process.start()
    outcome = result.get(timeout=120)
    process.join(timeout=30)
    return outcome


def test_two_concurrent_runs_prepare_one_model_and_a_third_is_instant(shared_tmp: Path) -> None:
    first, second = _run_demo_model(shared_tmp), _run_demo_model(shared_tmp)
    outputs = [p.communicate(timeout=900) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    dirs = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(dirs) == 1
    model_dir = Path(dirs.pop())
    assert model_dir.parent.parent == shared_tmp
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).stat().st_size > 0
    # exactly one process downloaded and converted; the other waited on the lock and reused the result
    logs = "".join(err for _, err in outputs)
    assert logs.count("converting") == 1, logs
    assert not list(model_dir.parent.glob(".work-*")), "no staging directory may be left behind"

    third = _run_demo_model(shared_tmp)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0 and out.strip().splitlines()[-1] == str(model_dir)
    assert "downloading" not in err and "converting" not in err

    # Readable by any uid, as a container running as another user mounts it (transformers saves weights 0600).
    for path in (shared_tmp / "demo", *(shared_tmp / "demo").rglob("*")):
        if path.name != ".prepare.lock":
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    if os.geteuid() != 0:
        return  # only root can become another uid
    assert _load_as_nobody(model_dir) == "ok"
    # and a file another uid cannot read is named as such, not reported missing
    (model_dir / "model.safetensors").chmod(0o600)
    failure = _load_as_nobody(model_dir)
    assert failure.startswith("ModelFilesError") and "model.safetensors (mode 0600, owner uid 0)" in failure, failure
    # a model left 0600 (as an earlier release prepared it) is mended the next time it is asked for
    fourth = _run_demo_model(shared_tmp)
    assert fourth.communicate(timeout=120) and fourth.returncode == 0
    assert stat.S_IMODE((model_dir / "model.safetensors").stat().st_mode) == 0o644
    assert _load_as_nobody(model_dir) == "ok"


def test_the_prepared_model_is_a_loadable_hf_directory(model_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
