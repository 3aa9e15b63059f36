"""Our configuration in OpenVINO GenAI's terms: the pipeline, its scheduler, and each request's settings."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import openvino_genai as ov_genai
from filelock import FileLock

from llm_endpoint.backends.config import ConfigError, ServingConfig, coerce_like
from llm_endpoint.backends.model_files import ModelFiles
from llm_endpoint.backends.openvino.ir_export import WEIGHT_FORMATS, convert_to_ir
from llm_endpoint.backends.types import GenerationRequest

log = logging.getLogger(__name__)

_DEVICE = "CPU"

_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # "auto": the plugin's choice (bf16 on AVX-512 BF16)

# The settings key that carries a request's JSON schema; GenAI takes it as a StructuredOutputConfig, which
# cannot cross the pipe to the engine process.
STRUCTURED_OUTPUT_SCHEMA = "json_schema"

_SCHEDULER_KEYS = (
    "cache_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "dynamic_split_fuse",
    "enable_prefix_caching", "use_cache_eviction",
)


def create_pipeline(config: ServingConfig, path: Path) -> Any:
    """The ContinuousBatchingPipeline `config` asks for, on the model at `path` (see `model_path`)."""
    properties: dict[str, Any] = {}
    if config.dtype in _PRECISION_HINTS:
        properties["INFERENCE_PRECISION_HINT"] = _PRECISION_HINTS[config.dtype]
    if config.prompt_lookup_num_tokens:  # GenAI's own prompt lookup; then every request must draft
        properties["prompt_lookup"] = True
    scheduler = scheduler_config(config)
    log.info("loading %s on OpenVINO %s, scheduler: %s", path, _DEVICE, scheduler.to_string().strip())
    return ov_genai.ContinuousBatchingPipeline(str(path), scheduler, _DEVICE, properties)


def model_path(config: ServingConfig, files: ModelFiles) -> Path:
    """What OpenVINO loads: the .gguf file or IR directory as given, an HF directory's (cached) IR."""
    quantize = config.quantize
    if files.kind == "hf":
        weight_format = quantize or ("fp32" if config.dtype == "fp32" else "fp16")
        if weight_format not in WEIGHT_FORMATS:
            raise ConfigError(f"invalid option.quantize={quantize!r} for openvino: expected int8 or int4")
        return convert_to_ir(files.directory, weight_format, config.cache_dir, config.optimum_cli)
    if quantize:
        log.warning("option.quantize=%s ignored: %s already holds its weights' format", quantize, files.path)
    return writable_gguf(files.path, config.cache_dir) if files.kind == "gguf" else files.path


def writable_gguf(path: Path, cache_dir: Path) -> Path:
    """`path`, or a copy in the cache when this process may not write it.

    GenAI opens a .gguf read-write (gguf_open), which fails on a read-only mount (SageMaker mounts
    /opt/ml/model read-only) and for a file owned by another uid; it writes nothing, so a private copy,
    made once and keyed by the file's path, size and mtime, loads the same model.
    """
    if os.access(path, os.W_OK):
        return path
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "gguf" / f"{path.stem}-{digest}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            log.info("copying %s to %s: OpenVINO GenAI opens GGUF files read-write, and this one is read-only",
                     path, target)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(path, partial)
            partial.rename(target)
    return target


def scheduler_config(config: ServingConfig) -> Any:
    """LMI batch settings plus any SchedulerConfig field given as `option.<field>`."""
    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_seqs = config.effective_max_rolling_batch_size
    if config.max_rolling_batch_prefill_tokens:
        scheduler.max_num_batched_tokens = config.max_rolling_batch_prefill_tokens
    if config.enable_stateful_sessions:  # a session's turns resend the history: reuse its KV
        scheduler.enable_prefix_caching = True
        # With the cache sized dynamically (cache_size 0) GenAI gives cached blocks back as soon as another
        # request runs, and a session's next turn finds nothing (measured); a fixed pool keeps them.
        scheduler.cache_size = _session_cache_gib()
    for key, value in config.engine_options.items():
        if key not in _SCHEDULER_KEYS:
            log.warning("ignoring option.%s: not an OpenVINO GenAI scheduler setting (%s)", key,
                        ", ".join(_SCHEDULER_KEYS))
            continue
        try:
            setattr(scheduler, key, coerce_like(value, getattr(scheduler, key)))
        except ValueError as exc:
            raise ConfigError(f"invalid option.{key}={value!r}: {exc}") from None
    return scheduler


def _session_cache_gib() -> int:
    """The fixed KV pool with sessions on (GiB, as GenAI takes it): an eighth of RAM, at least 1."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, physical // 8 // 2**30)


def generation_settings(request: GenerationRequest, max_new_tokens: int, max_ngram: int) -> dict[str, Any]:
    """GenerationConfig fields for one request (plain values: they cross to the engine process)."""
    params = request.params
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "ignore_eos": params.ignore_eos,
        "repetition_penalty": params.repetition_penalty,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        # 1 = the chosen token's log-prob, from the raw distribution; GenAI returns no top-n alternatives.
        "logprobs": 1,
        "echo": params.prompt_logprobs,
    }
    if params.json_schema is not None:  # GenAI's own structured output; engine_process builds its config
        settings[STRUCTURED_OUTPUT_SCHEMA] = params.json_schema
    if params.prompt_lookup_num_tokens:
        settings.update(num_assistant_tokens=params.prompt_lookup_num_tokens, max_ngram_size=max_ngram)
    if params.do_sample and params.temperature > 0:
        settings.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        if params.top_k > 0:
            settings["top_k"] = params.top_k
        # GenAI's default seed is a constant 0: every unseeded request would draw the same samples.
        settings["rng_seed"] = params.seed if params.seed is not None else random.getrandbits(32)
    return settings
