"""Reading LMI's configuration: serving.properties, OPTION_* and the SageMaker/TGI environment variables.

Precedence follows LMI (djl-serving's configuration docs and `ModelInfo`): serving.properties > OPTION_* > TGI/SageMaker-style
variables > defaults, with SageMaker's own variables (`SAGEMAKER_*`) overriding last, as LMI's Java
`SageMakerCompatibility` does. The result is one frozen `ServingConfig`. This module is the only reader of the
environment: the CLI hands it `os.environ`, and everything else is given the values it needs.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llm_endpoint.backends.config import ROLLING_BATCH_ALIASES, ConfigError, RollingBatch, ServingConfig

log = logging.getLogger(__name__)

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
DEFAULT_PORT = 8080


# The LMI `option.*` keys this server understands itself; any other option.* is kept for engines
# that accept arbitrary engine arguments (vLLM).
_OPTION_FIELDS = {
    "model_id": "model_id",
    "revision": "revision",
    "trust_remote_code": "trust_remote_code",
    "task": "task",
    "rolling_batch": "rolling_batch",
    "tensor_parallel_degree": "tensor_parallel_degree",
    "pipeline_parallel_degree": "pipeline_parallel_degree",
    "max_rolling_batch_size": "max_rolling_batch_size",
    "max_rolling_batch_prefill_tokens": "max_rolling_batch_prefill_tokens",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "default_max_new_tokens": "default_max_new_tokens",
    "output_formatter": "output_formatter",
    "tgi_compat": "tgi_compat",
    "enforce_eager": "enforce_eager",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "quantize": "quantize",
    "model_loading_timeout": "model_loading_timeout",
    "device": "device",
    "kv_cache_space": "kv_cache_space",
    "enable_stateful_sessions": "enable_stateful_sessions",
    "sessions_expiration": "sessions_expiration",
    "sessions_max_memory": "sessions_max_memory",
    "attention_sinks": "attention_sinks",
    "attention_window": "attention_window",
    "prompt_lookup_num_tokens": "prompt_lookup_num_tokens",
    "prompt_lookup_max_ngram": "prompt_lookup_max_ngram",
    "compile_decode": "compile_decode",
    "chat_template_timeout": "chat_template_timeout",
    "chat_template": "chat_template",
    "enable_auto_tool_choice": "enable_auto_tool_choice",
    "tool_call_parser": "tool_call_parser",
    "api_key": "api_key",
    "expose_model_url": "expose_model_url",
}
# Server-level keys: `key` in serving.properties or SERVING_<KEY> in the environment.
_SERVER_FIELDS = {
    "job_queue_size": "job_queue_size",
    "max_request_size": "max_request_size",
    "max_header_size": "max_header_size",
    "header_read_timeout": "header_read_timeout",
    "body_read_timeout": "body_read_timeout",
    "keep_alive_timeout": "keep_alive_timeout",
    "max_connections": "max_connections",
    "graceful_shutdown_timeout": "graceful_shutdown_timeout",
}
# Entry-point translations (LMI's dockerd-entrypoint): applied only when the target is unset.
_ENV_TRANSLATIONS = {
    "HF_MODEL_QUANTIZE": "OPTION_QUANTIZE",
    "HF_MODEL_TRUST_REMOTE_CODE": "OPTION_TRUST_REMOTE_CODE",
    "SM_NUM_GPUS": "TENSOR_PARALLEL_DEGREE",
    "MAX_CONCURRENT_REQUESTS": "SERVING_JOB_QUEUE_SIZE",
    "MAX_BATCH_PREFILL_TOKENS": "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS",
    "MAX_BATCH_SIZE": "OPTION_MAX_ROLLING_BATCH_SIZE",
    "CUDA_MEMORY_FRACTION": "OPTION_GPU_MEMORY_UTILIZATION",
    # what SageMaker's model-hosting container standards read for stateful sessions
    "SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "OPTION_ENABLE_STATEFUL_SESSIONS",
    "SAGEMAKER_SESSIONS_EXPIRATION": "OPTION_SESSIONS_EXPIRATION",
}


def cache_root(environ: Mapping[str, str]) -> Path:
    """Where downloads, the demo model and conversions are kept: LLM_ENDPOINT_CACHE, else ~/.cache/llm-endpoint."""
    configured = environ.get("LLM_ENDPOINT_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "llm-endpoint"


def bind_port(environ: Mapping[str, str]) -> int:
    """SAGEMAKER_BIND_TO_PORT (SageMaker sets it for inference pipelines), else 8080."""
    value = environ.get("SAGEMAKER_BIND_TO_PORT", str(DEFAULT_PORT))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"invalid SAGEMAKER_BIND_TO_PORT={value!r}: expected a port number 1-65535")
    return int(value)


def model_id_configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment names the model (then no model directory is needed)."""
    return bool(environ.get("HF_MODEL_ID") or environ.get("OPTION_MODEL_ID"))


def log_level(environ: Mapping[str, str]) -> str:
    return environ.get("LLM_ENDPOINT_LOG_LEVEL", "info")


def _optimum_cli(environ: Mapping[str, str]) -> str | None:
    """optimum-intel pins an older transformers, so it usually lives in its own environment."""
    return environ.get("LLM_ENDPOINT_OPTIMUM_CLI") or shutil.which("optimum-cli", path=environ.get("PATH"))


def parse_properties(text: str) -> dict[str, str]:
    """Parse a Java .properties file: `key=value` or `key: value`, `#`/`!` comments, `\\` continuations."""
    props: dict[str, str] = {}
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip() if not logical else raw.lstrip()
        if not logical and (not line or line[0] in "#!"):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            logical.append(line[:-1])
            continue
        logical.append(line)
        full = "".join(logical)
        logical = []
        m = re.match(r"^((?:\\.|[^=:\s])+)\s*[=:\s]\s*(.*)$", full)
        if m:
            props[m.group(1).replace("\\", "")] = m.group(2).strip()
        else:
            props[full.strip()] = ""
    return props


def _env_option_key(name: str) -> str:
    """OPTION_MAX_MODEL_LEN -> option.max_model_len, as LMI's ModelInfo does."""
    key = name[len("OPTION_") :]
    if key == "ENTRYPOINT":
        return "option.entryPoint"
    if key == "ENGINE":
        return "engine"
    if re.fullmatch(r"[A-Z_\d]+", key):
        key = key.lower()
    return "option." + key


def _infer_model_name(model_id: str, model_dir: Path | None) -> str:
    """LMI: /opt/ml/model -> `model`; HF_MODEL_ID=org/name -> `org_name`; else the directory's name."""
    if model_dir is not None and model_dir == SAGEMAKER_MODEL_DIR:
        return "model"
    base = model_id.rstrip("/")
    if "://" in base:
        name = base.split("://", 1)[1]
    elif base.startswith(("/", ".", "~")) or Path(base).exists():
        name = Path(base).name.removesuffix(".gguf")
    else:  # hub id: org/name
        name = base
    return re.sub(r"(\W|^_)", "_", name) or "model"


def load_config(model_dir: Path | None, environ: Mapping[str, str]) -> ServingConfig:
    """Merge the sources with LMI's precedence and validate. Raises ConfigError with one clear line."""
    env = {k: v for k, v in environ.items() if v != ""}
    for source, target in _ENV_TRANSLATIONS.items():
        if source in env and target not in env:
            env[target] = env[source]
    if "ENABLE_CUDA_GRAPHS" in env and "OPTION_ENFORCE_EAGER" not in env:
        env["OPTION_ENFORCE_EAGER"] = "false" if env["ENABLE_CUDA_GRAPHS"].lower() == "true" else "true"

    props: dict[str, str] = {}
    origin: dict[str, str] = {}  # key -> where it came from, for error messages
    if model_dir is not None and (model_dir / "serving.properties").is_file():
        path = model_dir / "serving.properties"
        for key, value in parse_properties(path.read_text(encoding="utf-8")).items():
            props[key] = value
            origin[key] = f"{key} (serving.properties)"
    for name, value in env.items():
        if name.startswith("OPTION_"):
            key = _env_option_key(name)
            if key not in props:
                props[key] = value
                origin[key] = f"{key} (env {name})"
    for name, key in (
        ("HF_MODEL_ID", "option.model_id"),
        ("HF_REVISION", "option.revision"),
        ("HF_TASK", "option.task"),
        ("TENSOR_PARALLEL_DEGREE", "option.tensor_parallel_degree"),
        ("PIPELINE_PARALLEL_DEGREE", "option.pipeline_parallel_degree"),
    ):
        if name in env and key not in props:
            props[key] = env[name]
            origin[key] = f"{key} (env {name})"
    for name, value in env.items():
        if name.startswith("SERVING_"):
            key = name[len("SERVING_") :].lower()
            if key not in props:
                props[key] = value
                origin[key] = f"{key} (env {name})"
    # SageMaker's own variables overwrite (LMI SageMakerCompatibility uses setProperty).
    if "SAGEMAKER_MAX_REQUEST_SIZE" in env:
        props["max_request_size"], origin["max_request_size"] = env["SAGEMAKER_MAX_REQUEST_SIZE"], (
            "max_request_size (env SAGEMAKER_MAX_REQUEST_SIZE)"
        )
    elif "SAGEMAKER_MAX_PAYLOAD_IN_MB" in env:
        try:
            props["max_request_size"] = str(int(env["SAGEMAKER_MAX_PAYLOAD_IN_MB"]) * 1024 * 1024)
        except ValueError:
            props["max_request_size"] = env["SAGEMAKER_MAX_PAYLOAD_IN_MB"]
        origin["max_request_size"] = "max_request_size (env SAGEMAKER_MAX_PAYLOAD_IN_MB)"
    if "SAGEMAKER_STARTUP_TIMEOUT" in env:
        props["option.model_loading_timeout"] = env["SAGEMAKER_STARTUP_TIMEOUT"]
        origin["option.model_loading_timeout"] = "option.model_loading_timeout (env SAGEMAKER_STARTUP_TIMEOUT)"

    values: dict[str, Any] = {}
    engine_options: dict[str, str] = {}
    for key, value in props.items():
        if key.startswith("option."):
            short = key[len("option.") :]
            if short in _OPTION_FIELDS:
                values[_OPTION_FIELDS[short]] = value
            else:
                engine_options[short] = value
        elif key in _SERVER_FIELDS:
            values[_SERVER_FIELDS[key]] = value
        elif key == "engine":
            continue  # Python/MPI: meaningful to DJL's process model only.
        else:
            log.warning("ignoring unknown setting %s=%s", key, value)
    values["engine_options"] = engine_options

    model_id = values.get("model_id")
    if not model_id:
        if model_dir is None:
            raise ConfigError("no model: pass --model-dir, mount /opt/ml/model, or set option.model_id / HF_MODEL_ID")
        model_id = str(model_dir)
        origin.setdefault("model_id", f"--model-dir {model_dir}")
    values["model_id"] = model_id
    values["model_name"] = _infer_model_name(model_id, model_dir)
    values["cache_dir"] = cache_root(env)
    values["optimum_cli"] = _optimum_cli(env)

    try:
        return ServingConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        key = next((k for k, f in {**_OPTION_FIELDS, **_SERVER_FIELDS}.items() if f == field), field)
        where = origin.get(f"option.{key}") or origin.get(key) or key
        raw = values.get(field)
        raise ConfigError(f"invalid {where}={raw!r}: {_describe(field, err)}") from None


def _describe(field: str, err: Mapping[str, Any]) -> str:
    """Turn a pydantic error into 'expected ...' wording users can act on."""
    if field == "rolling_batch":
        allowed = sorted([m.value for m in RollingBatch] + list(ROLLING_BATCH_ALIASES))
        return "expected one of " + ", ".join(allowed)
    if field == "dtype":
        return "expected one of auto, fp32, fp16, bf16 (or float32, float16, bfloat16)"
    if field == "output_formatter":
        return "expected one of json, jsonlines, sse"
    if field == "device":
        return "expected one of auto, cpu, cuda"
    if field == "tool_call_parser":
        return "expected one of hermes"
    if field == "tensor_parallel_degree":
        return "expected 'max' or a positive integer"
    if field == "compile_decode":
        return "expected auto, true or false"
    ctx = err.get("ctx") or {}
    bounds = " and ".join(f"{op} {ctx[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if k in ctx)
    annotation = str(ServingConfig.model_fields[field].annotation) if field in ServingConfig.model_fields else ""
    if "int" in annotation:
        return "expected an integer" + (f" {bounds}" if bounds else "")
    if "float" in annotation:
        return "expected a number" + (f" {bounds}" if bounds else "")
    if "bool" in annotation:
        return "expected true or false"
    return str(err.get("msg", "invalid value"))
