"""Pick and build the engine named by `option.rolling_batch`."""

from __future__ import annotations

import logging
from typing import Any

from backends.base import Backend
from backends.model_files import ModelFiles
from server.config import RollingBatch, ServingConfig

log = logging.getLogger(__name__)


class BackendUnavailable(Exception):
    """The configured engine cannot run here; the message says what is missing."""


_NOT_BUILT = {
    RollingBatch.TRTLLM: "TensorRT-LLM",
    RollingBatch.DEEPSPEED: "DeepSpeed",
    RollingBatch.NEURONX: "Transformers NeuronX",
}


def resolve_rolling_batch(config: ServingConfig, files: ModelFiles) -> RollingBatch:
    """`auto`: our engine until faster engines are wired in; logs why."""
    choice = config.rolling_batch
    if choice is RollingBatch.AUTO:
        log.info("option.rolling_batch=auto -> scheduler (our PyTorch engine)")
        return RollingBatch.SCHEDULER
    return choice


def create_backend(config: ServingConfig, files: ModelFiles, tokenizer: Any, max_model_len: int) -> Backend:
    choice = resolve_rolling_batch(config, files)
    if choice in _NOT_BUILT:
        raise BackendUnavailable(
            f"option.rolling_batch={choice.value}: the {_NOT_BUILT[choice]} backend is not available in "
            "llm-endpoint yet; use scheduler, disable, vllm or openvino"
        )
    if choice in (RollingBatch.SCHEDULER, RollingBatch.DISABLE):
        if files.kind == "openvino":
            raise BackendUnavailable(
                f"option.rolling_batch={choice.value} needs an HF directory or .gguf file; {files.path} is "
                "OpenVINO IR (use option.rolling_batch=openvino)"
            )
        from backends.torch_engine.engine import DEFAULT_PREFILL_TOKENS, TorchBackend
        from backends.torch_engine.loader import load_causal_lm

        def load_model() -> Any:
            return load_causal_lm(
                files, dtype=config.dtype, device=config.device,
                trust_remote_code=config.trust_remote_code, revision=config.revision,
            )

        max_running = 1 if choice is RollingBatch.DISABLE else config.effective_max_rolling_batch_size
        backend = TorchBackend(
            load_model, tokenizer, max_running=max_running, max_model_len=max_model_len,
            prefill_tokens=config.max_rolling_batch_prefill_tokens or DEFAULT_PREFILL_TOKENS,
        )
        backend.name = choice.value
        return backend
    raise BackendUnavailable(f"option.rolling_batch={choice.value}: backend not installed")
