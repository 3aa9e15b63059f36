"""`llm-endpoint demo-model`: prepares the demo model once, idempotently, even when started twice at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _run_demo_model(cache: Path) -> subprocess.Popen:
    env = {**os.environ, "LLM_ENDPOINT_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "llm_endpoint.server.cli", "demo-model"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_concurrent_runs_prepare_one_model_and_a_third_is_instant(tmp_path: Path) -> None:
    first, second = _run_demo_model(tmp_path), _run_demo_model(tmp_path)
    outputs = [p.communicate(timeout=900) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    dirs = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(dirs) == 1
    model_dir = Path(dirs.pop())
    assert model_dir.parent.parent == tmp_path
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).stat().st_size > 0
    # exactly one process downloaded and converted; the other waited on the lock and reused the result
    logs = "".join(err for _, err in outputs)
    assert logs.count("converting") == 1, logs
    assert not list(model_dir.parent.glob(".work-*")), "no staging directory may be left behind"

    third = _run_demo_model(tmp_path)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0 and out.strip().splitlines()[-1] == str(model_dir)
    assert "downloading" not in err and "converting" not in err


def test_the_prepared_model_is_a_loadable_hf_directory(model_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
