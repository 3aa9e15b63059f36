"""LMI configuration precedence, translations and start-up errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from llm_endpoint.backends.config import ConfigError, RollingBatch
from llm_endpoint.server.config import load_config, parse_properties
from tests.conftest import free_port, make_config

REPO = Path(__file__).resolve().parent.parent


def write_props(tmp_path: Path, text: str) -> Path:
    (tmp_path / "serving.properties").write_text(text)
    return tmp_path


def test_properties_parser_handles_java_syntax() -> None:
    props = parse_properties("# comment\n! also comment\noption.a = 1\noption.b:2\noption.c  long \\\n   value\n\n")
    assert props == {"option.a": "1", "option.b": "2", "option.c": "long value"}


def test_serving_properties_beat_option_env_which_beats_tgi_env(tmp_path: Path) -> None:
    d = write_props(tmp_path, "option.max_rolling_batch_size=4\n")
    env = {
        "OPTION_MAX_ROLLING_BATCH_SIZE": "8", "MAX_BATCH_SIZE": "16",
        "OPTION_DTYPE": "bf16", "HF_MODEL_ID": "/models/x", "OPTION_MODEL_ID": "/models/y",
    }
    cfg = load_config(d, env)
    assert cfg.max_rolling_batch_size == 4
    assert cfg.dtype == "bf16"
    assert cfg.model_id == "/models/y"


def test_tgi_style_variables_translate_when_lmi_ones_are_unset(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, {
        "MAX_BATCH_SIZE": "16", "MAX_CONCURRENT_REQUESTS": "7", "SM_NUM_GPUS": "2",
        "HF_MODEL_TRUST_REMOTE_CODE": "true", "MAX_BATCH_PREFILL_TOKENS": "512", "ENABLE_CUDA_GRAPHS": "false",
        "CUDA_MEMORY_FRACTION": "0.5", "HF_MODEL_QUANTIZE": "awq", "HF_REVISION": "abc",
    })
    assert (cfg.max_rolling_batch_size, cfg.job_queue_size, cfg.tensor_parallel_degree) == (16, 7, 2)
    assert cfg.trust_remote_code and cfg.enforce_eager
    assert (cfg.max_rolling_batch_prefill_tokens, cfg.gpu_memory_utilization, cfg.quantize) == (512, 0.5, "awq")
    assert cfg.revision == "abc"


def test_serving_env_sets_server_keys_and_sagemaker_overrides(tmp_path: Path) -> None:
    d = write_props(tmp_path, "max_request_size=2048\n")
    cfg = load_config(d, {"SERVING_JOB_QUEUE_SIZE": "3", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "6",
                          "SAGEMAKER_STARTUP_TIMEOUT": "99"})
    assert cfg.job_queue_size == 3
    assert cfg.max_request_size == 6 * 1024 * 1024
    assert cfg.model_loading_timeout == 99


def test_defaults_and_recommender(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, {})
    assert cfg.model_id == str(tmp_path)
    assert cfg.rolling_batch is RollingBatch.AUTO
    assert cfg.effective_max_rolling_batch_size == 32
    assert cfg.job_queue_size == 1000 and cfg.default_max_new_tokens == 30
    assert load_config(tmp_path, {"OPTION_ROLLING_BATCH": "lmi-dist"}).effective_max_rolling_batch_size == 256


def test_lmi_dist_is_vllm_and_unknown_options_pass_through(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, {"OPTION_ROLLING_BATCH": "lmi-dist", "OPTION_ENABLE_PREFIX_CACHING": "true"})
    assert cfg.rolling_batch is RollingBatch.VLLM
    assert cfg.engine_options == {"enable_prefix_caching": "true"}


def test_session_and_sink_options_and_their_sagemaker_variables(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, {"SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true", "SAGEMAKER_SESSIONS_EXPIRATION": "60",
                                 "OPTION_SESSIONS_MAX_MEMORY": "1.5", "OPTION_ATTENTION_WINDOW": "500"})
    assert (cfg.enable_stateful_sessions, cfg.sessions_expiration, cfg.sessions_max_memory) == (True, 60, 1.5)
    assert cfg.attention_sinks_enabled and (cfg.sink_tokens, cfg.window_tokens) == (4, 500)
    defaults = load_config(tmp_path, {})
    assert not defaults.enable_stateful_sessions and defaults.sessions_expiration == 1200
    assert not defaults.attention_sinks_enabled
    assert load_config(tmp_path, {"OPTION_ATTENTION_SINKS": "0"}).attention_sinks_enabled  # a plain window


def test_compile_decode_is_auto_unless_set(tmp_path: Path) -> None:
    """None is "auto" (the engine decides, see `compile_by_default_reason`); true and false are the user's."""
    assert load_config(tmp_path, {}).compile_decode is None
    assert load_config(tmp_path, {"OPTION_COMPILE_DECODE": " Auto "}).compile_decode is None
    assert load_config(tmp_path, {"OPTION_COMPILE_DECODE": "true"}).compile_decode is True
    assert load_config(tmp_path, {"OPTION_COMPILE_DECODE": "off"}).compile_decode is False


def test_model_name_follows_lmi(tmp_path: Path) -> None:
    assert load_config(tmp_path, {"HF_MODEL_ID": "org/my-model"}).model_name == "org_my_model"
    assert load_config(tmp_path / "x", {}).model_name == "x"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"OPTION_MAX_ROLLING_BATCH_SIZE": "abc"},
         "option.max_rolling_batch_size (env OPTION_MAX_ROLLING_BATCH_SIZE)='abc': expected an integer"),
        ({"OPTION_ROLLING_BATCH": "turbo"}, "option.rolling_batch (env OPTION_ROLLING_BATCH)='turbo': expected one of"),
        ({"OPTION_DTYPE": "int3"}, "option.dtype (env OPTION_DTYPE)='int3': expected one of auto, fp32"),
        ({"OPTION_TGI_COMPAT": "maybe"}, "expected true or false"),
        ({"OPTION_MAX_MODEL_LEN": "0"}, "expected an integer >= 2"),
        ({"OPTION_GPU_MEMORY_UTILIZATION": "1.5"}, "expected a number"),
        ({"SERVING_JOB_QUEUE_SIZE": "-1"}, "job_queue_size (env SERVING_JOB_QUEUE_SIZE)='-1'"),
        ({"OPTION_ENABLE_STATEFUL_SESSIONS": "sure"}, "expected true or false"),
        ({"OPTION_ATTENTION_WINDOW": "8"},
         "option.attention_window (env OPTION_ATTENTION_WINDOW)='8': expected an integer >= 32"),
        ({"OPTION_SESSIONS_EXPIRATION": "0"}, "expected an integer >= 1"),
        ({"OPTION_COMPILE_DECODE": "always"},
         "option.compile_decode (env OPTION_COMPILE_DECODE)='always': expected auto, true or false"),
    ],
)
def test_invalid_values_name_option_value_and_allowed(tmp_path: Path, env: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path, env)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_value_in_properties_file_is_attributed_to_it(tmp_path: Path) -> None:
    d = write_props(tmp_path, "option.max_rolling_batch_size=abc\n")
    with pytest.raises(ConfigError, match=r"option.max_rolling_batch_size \(serving.properties\)='abc'"):
        load_config(d, {})


def _serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "llm_endpoint.server.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        ([], {"OPTION_MAX_ROLLING_BATCH_SIZE": "abc"}, "option.max_rolling_batch_size"),
        ([], {"OPTION_ROLLING_BATCH": "fastest"}, "option.rolling_batch"),
        ([], {"OPTION_ROLLING_BATCH": "trtllm"}, "TensorRT-LLM backend is not available"),
        (["--model-dir", "/nonexistent/model"], {}, "does not exist"),
    ],
)
def test_serve_refuses_bad_config_with_one_line_and_nonzero_exit(
    model_dir: Path, args: list[str], env: dict, fragment: str
) -> None:
    result = _serve(args or ["--model-dir", str(model_dir)], env)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("llm-endpoint: error:")]
    assert len(error_lines) == 1, result.stderr
    assert fragment in error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is None, reason="needs the openvino extra")
def test_auto_on_cpu_picks_our_engine_for_hf_and_openvino_for_gguf_and_ir(tmp_path: Path) -> None:
    """The CPU image's case (openvino extra, a converter configured): an HF directory goes to our engine, the
    one that answers every documented parameter (top_n_tokens among them), converter or not; GGUF and IR,
    which only OpenVINO reads natively, to OpenVINO."""
    from llm_endpoint.backends.model_files import ModelFiles
    from llm_endpoint.backends.registry import resolve_rolling_batch

    formats = [ModelFiles("hf", tmp_path), ModelFiles("gguf", tmp_path, "m.gguf"), ModelFiles("openvino", tmp_path)]
    for converter in ("/opt/optimum-venv/bin/optimum-cli", None):
        config = make_config(model_id="unused", device="cpu", optimum_cli=converter)
        assert [resolve_rolling_batch(config, files) for files in formats] == [
            RollingBatch.SCHEDULER, RollingBatch.OPENVINO, RollingBatch.OPENVINO]


def test_a_default_install_answers_alternatives_over_http(model_dir: Path, tmp_path: Path) -> None:
    """`auto` as the CPU image runs it (every extra this machine has, the converter configured): the server it
    starts for the demo model reports `top_n_tokens` and chat `top_logprobs` alternatives, not a 424."""
    import requests

    from tests.conftest import start_server

    # with compile_decode at its default the bf16 engine would compile for ~2 min; what is tested is the same
    server = start_server(model_dir, {"max_rolling_batch_size": "2", "compile_decode": "false"}, tmp_path, "auto")
    try:
        assert "option.rolling_batch=auto -> scheduler" in server.log_tail()
        lmi = requests.post(server.url + "/invocations", timeout=120, json={
            "inputs": "The capital of France is", "parameters": {"max_new_tokens": 3, "details": True,
                                                                 "top_n_tokens": 3}})
        assert lmi.status_code == 200, lmi.text
        assert [len(top) for top in lmi.json()["details"]["top_tokens"]] == [3, 3, 3]
        chat = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 3})
        assert chat.status_code == 200, chat.text
        assert [len(e["top_logprobs"]) for e in chat.json()["choices"][0]["logprobs"]["content"]] == [3, 3]
    finally:
        server.stop()
