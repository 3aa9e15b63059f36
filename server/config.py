"""LMI-compatible configuration: serving.properties, OPTION_* and the SageMaker/TGI environment variables.

Precedence follows LMI (lmi-contract.md section 2): serving.properties > OPTION_* > TGI/SageMaker-style
variables > defaults, with SageMaker's own variables (`SAGEMAKER_*`) overriding last, as LMI's Java
`SageMakerCompatibility` does. The result is one frozen `ServingConfig`; nothing else reads the environment.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


class ConfigError(Exception):
    """Start-up configuration is invalid; the message is one line naming the option, value and what is allowed."""


class RollingBatch(str, enum.Enum):
    AUTO = "auto"
    SCHEDULER = "scheduler"
    DISABLE = "disable"
    VLLM = "vllm"
    OPENVINO = "openvino"
    TRTLLM = "trtllm"
    DEEPSPEED = "deepspeed"
    NEURONX = "neuronx"


# LMI names that map onto another engine (LMI v15 rewrote lmi-dist to vllm).
ROLLING_BATCH_ALIASES = {"lmi-dist": "vllm", "tnx": "neuronx", "lmi_dist": "vllm"}

OutputFormatter = Literal["json", "jsonlines", "sse"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}

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
}
# Server-level keys: `key` in serving.properties or SERVING_<KEY> in the environment.
_SERVER_FIELDS = {
    "job_queue_size": "job_queue_size",
    "max_request_size": "max_request_size",
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
}


class ServingConfig(BaseModel):
    """Everything the server and engines are told. Keys are named after their LMI option."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str = Field(description="local HF directory, .gguf file, s3:// URI or hub id")
    model_name: str = "model"
    revision: str | None = None
    trust_remote_code: bool = False
    task: str | None = None
    rolling_batch: RollingBatch = RollingBatch.AUTO
    tensor_parallel_degree: int | Literal["max"] = "max"
    pipeline_parallel_degree: int = Field(1, ge=1)
    max_rolling_batch_size: int | None = Field(None, ge=1, le=4096)
    max_rolling_batch_prefill_tokens: int | None = Field(None, ge=16)
    job_queue_size: int = Field(1000, ge=1)
    dtype: DType = "auto"
    max_model_len: int | None = Field(None, ge=2)
    default_max_new_tokens: int = Field(30, ge=1)
    output_formatter: OutputFormatter | None = None
    tgi_compat: bool = False
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    quantize: str | None = None
    model_loading_timeout: int = Field(1800, ge=1)
    max_request_size: int = Field(64 * 1024 * 1024, ge=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine_options: dict[str, str] = Field(default_factory=dict)

    @field_validator("rolling_batch", mode="before")
    @classmethod
    def _rolling_batch_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            return ROLLING_BATCH_ALIASES.get(v, v)
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            return _DTYPE_ALIASES.get(v, v)
        return v

    @field_validator("tensor_parallel_degree", mode="before")
    @classmethod
    def _tp(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "max":
            return "max"
        return v

    @field_validator("trust_remote_code", "tgi_compat", "enforce_eager", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any) -> Any:
        if isinstance(v, str):
            low = v.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        return v

    @property
    def effective_max_rolling_batch_size(self) -> int:
        """LMI's recommender default: 256 for vLLM-style engines, else 32."""
        if self.max_rolling_batch_size is not None:
            return self.max_rolling_batch_size
        return 256 if self.rolling_batch in (RollingBatch.VLLM, RollingBatch.TRTLLM) else 32


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
    if field == "tensor_parallel_degree":
        return "expected 'max' or a positive integer"
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
