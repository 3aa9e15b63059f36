"""The benchmark scripts still run end to end, and `vllm serve` is given our engine's exact configuration.

They measure what the README's performance tables report, so a broken protocol between bench.py and
bench_direct.py, or `vllm serve` flags that no longer reproduce our engine arguments, must fail here rather
than in the next person's benchmark run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_runs_server_and_engine_direct(model_dir: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--model-dir", str(model_dir), "--backend", "scheduler", "--direct",
         "--api", "lmi,openai-chat", "--concurrency", "1,2", "--requests-per-level", "2", "--max-new-tokens", "4",
         # the default bf16 engine would compile its one-row step (~1 min) for each of its two engines
         "--server-option", "compile_decode=false", "--json", str(out), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    levels = {(lv["config"], lv["concurrency"]): lv for lv in doc["levels"]}
    targets = ("scheduler", "scheduler/openai-chat", "scheduler-direct")
    assert set(levels) == {(t, c) for t in targets for c in (1, 2)}
    for level in levels.values():
        assert (level["requests"], level["errors"], level["output_tokens"]) == (2, 0, 8)
        assert level["ttft_p50_ms"] > 0 and level["itl_p50_ms"] > 0
    # the same prompts for the server (in both formats) and the engine called directly
    for c in (1, 2):
        prompts = [sorted(r["prompt"] for r in levels[t, c]["per_request"]) for t in targets]
        assert prompts == [[0, 1]] * 3
    assert "scheduler / scheduler-direct" in result.stdout
    assert list((tmp_path / "logs").glob("*.log"))  # process logs are kept


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_serve_args_reproduce_our_engine_arguments(model_dir: Path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from llm_endpoint.backends.vllm_backend import engine_args
    from llm_endpoint.server.cli import prepare_model
    from llm_endpoint.server.config import load_config

    env = {"OPTION_ROLLING_BATCH": "vllm", "OPTION_MAX_ROLLING_BATCH_SIZE": "12", "OPTION_ENFORCE_EAGER": "true",
           "OPTION_DTYPE": "fp32", "OPTION_BLOCK_SIZE": "64"}
    result = subprocess.run(
        [sys.executable, "scripts/bench_direct.py", "--engine", "vllm", "--model-dir", str(model_dir),
         "--serve-args"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**_base_env(), **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    serve = json.loads(result.stdout)
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(serve["args"])
    theirs = AsyncEngineArgs.from_cli_args(parsed)
    config = load_config(model_dir, env)
    files, _tokenizer, max_model_len = prepare_model(config)
    ours = engine_args(config, files, max_model_len)
    assert (theirs.max_num_seqs, theirs.enforce_eager, theirs.dtype, theirs.block_size) == (12, True, "float32", 64)
    for name in ("model", "max_model_len", "max_num_seqs", "enforce_eager", "dtype", "block_size", "logprobs_mode",
                 "tensor_parallel_size", "max_num_batched_tokens"):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert serve["env"]["VLLM_CPU_KVCACHE_SPACE"]


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "HF_MODEL"))}


def test_a_backend_variant_adds_its_own_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--backend scheduler,scheduler+compile_decode=true` compares an option's before and after in one run."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # the scripts import their siblings by name
    targets = importlib.import_module("bench_targets")
    assert targets.backend_variant("scheduler") == ("scheduler", {})
    assert targets.backend_variant("scheduler+compile_decode=true+dtype=bf16") == (
        "scheduler", {"OPTION_COMPILE_DECODE": "true", "OPTION_DTYPE": "bf16"})
    with pytest.raises(ValueError, match="B\\+KEY=VALUE"):
        targets.backend_variant("scheduler+compile_decode")
