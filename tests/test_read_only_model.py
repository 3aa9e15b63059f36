"""Every engine serves a model from a genuinely read-only mount, as SageMaker mounts /opt/ml/model.

A read-only bind mount, not chmod: the tests run as root, which ignores file modes. Where mounting is not
permitted (not root, no CAP_SYS_ADMIN) the tests skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import BACKEND_DEFAULTS, make_config, start_server


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """mount(source) -> a read-only view of `source`; every mount is undone at the end."""
    made: list[Path] = []

    def mount(source: Path) -> Path:
        target = tmp_path_factory.mktemp("read-only")
        result = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {result.stderr.strip()}")
        made.append(target)
        with pytest.raises(OSError, match="Read-only file system"):
            (target / "probe").write_text("")
        return target

    yield mount
    for target in reversed(made):
        subprocess.run(["umount", str(target)], check=True)


def _model(kind: str, model_dir: Path) -> Path:
    """The demo model as `kind`: its HF directory, its GGUF file's directory, or its fp32 IR (converted once)."""
    from llm_endpoint.server.demo_model import GGUF_NAME

    if kind == "hf":
        return model_dir
    if kind == "gguf":
        return model_dir.parent / GGUF_NAME
    from llm_endpoint.backends.openvino.ir_export import convert_to_ir

    config = make_config(model_id="unused")
    return convert_to_ir(model_dir, "fp32", config.cache_dir, config.optimum_cli)


CASES = [
    ("scheduler", "hf"),
    ("scheduler", "gguf"),
    ("vllm", "hf"),
    ("openvino", "gguf"),
    ("openvino", "hf"),  # converted from the read-only directory into the writable cache
    ("openvino", "ir"),
]


@pytest.mark.parametrize(("backend", "kind"), CASES, ids=[f"{b}-{k}" for b, k in CASES])
def test_engine_serves_a_read_only_model(
    backend: str, kind: str, model_dir: Path, mounts, tmp_path: Path
) -> None:
    if importlib.util.find_spec({"vllm": "vllm", "openvino": "openvino_genai"}.get(backend, "torch")) is None:
        pytest.skip(f"{backend} is not installed")
    needs_converter = kind == "ir" or (backend, kind) == ("openvino", "hf")
    if needs_converter and make_config(model_id="unused").optimum_cli is None:
        pytest.skip("no optimum-cli (set LLM_ENDPOINT_OPTIMUM_CLI)")
    source = _model(kind, model_dir)
    mounted = mounts(source.parent if source.is_file() else source)
    location = mounted / source.name if source.is_file() else mounted
    server = start_server(location, BACKEND_DEFAULTS.get(backend, {}), tmp_path, backend)
    try:
        res = requests.post(server.url + "/invocations", json={"inputs": "The capital of France is",
                                                               "parameters": {"max_new_tokens": 4}}, timeout=120)
        assert res.status_code == 200, res.text
        assert res.json()["generated_text"]
    finally:
        server.stop()
