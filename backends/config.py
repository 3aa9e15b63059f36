"""The typed serving configuration every engine is built from, and the typing of `option.X` strings.

It lives on the engines' side, as DJL keeps its properties models beside the rolling batch, so backends
never import the HTTP server; `llm_endpoint.server.config` reads the files and environment into it.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator


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

# LMI's `option.output_formatter` values; also what a request's response is written as.
ResponseFormat = Literal["json", "jsonlines", "sse"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}

# Other names users write for a setting's values, by field.
_ALIASES = {"rolling_batch": ROLLING_BATCH_ALIASES, "dtype": _DTYPE_ALIASES}

DEFAULT_ATTENTION_SINKS = 4  # StreamingLLM's start_size
DEFAULT_ATTENTION_WINDOW = 2044  # recent tokens; with 4 sinks a 2048-entry cache

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_bool(value: str) -> bool:
    """The one reading of a boolean setting, for our options and engine arguments alike."""
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true or false")


def coerce_like(value: str, default: object) -> object:
    """Convert `value` to the type of a setting's current value (bool, int, float or str)."""
    if isinstance(default, bool):
        return parse_bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


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
    output_formatter: ResponseFormat | None = None
    tgi_compat: bool = False
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    quantize: str | None = None
    model_loading_timeout: int = Field(1800, ge=1)
    max_request_size: int = Field(64 * 1024 * 1024, ge=1024)
    # HTTP limits (server keys, SERVING_<KEY>): a request's head (request line and headers) in bytes; seconds
    # a client may take to send its head, and its body; idle seconds a kept-alive connection stays open; open
    # connections at most; seconds SIGTERM waits for admitted requests to finish before cutting them.
    max_header_size: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_read_timeout: float = Field(10.0, gt=0)
    body_read_timeout: float = Field(60.0, gt=0)
    keep_alive_timeout: float = Field(75.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    graceful_shutdown_timeout: float = Field(30.0, ge=0)
    # Seconds and characters a chat template may spend rendering one request (user content cannot run code in
    # the sandboxed template, but a template's loops over it can be made to run long).
    chat_template_timeout: float = Field(2.0, gt=0)
    # OpenAI tool calling, with vLLM's (and LMI's) option names: a chat template (a jinja file, or the template
    # text itself) in place of the tokenizer's; whether `tool_choice="auto"` is served (the model decides,
    # and its output is parsed for calls); and the format the model writes calls in.
    chat_template: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: Literal["hermes"] = "hermes"
    # Bearer token every route but /ping requires (off when unset); SageMaker itself needs none.
    api_key: SecretStr | None = None
    # /models and /models/{name} show option.model_id (a local path or S3 URI) only when this is set.
    expose_model_url: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # GiB of KV cache for our engine (scheduler/disable); unset: every slot at full length, at most 1/4 of RAM.
    kv_cache_space: float | None = Field(None, gt=0)
    # SageMaker stateful sessions (LMI's option names): idle seconds before a session expires, and GiB of
    # KV cache idle sessions may keep on our engine (unset: 1/8 of RAM; least recently used give way first).
    enable_stateful_sessions: bool = False
    sessions_expiration: int = Field(1200, ge=1)
    sessions_max_memory: float | None = Field(None, gt=0)
    # StreamingLLM on our engine: keep the first `attention_sinks` tokens and the last `attention_window`;
    # setting either turns it on (sinks 4, window DEFAULT_ATTENTION_WINDOW when the other is unset).
    attention_sinks: int | None = Field(None, ge=0, le=1024)
    attention_window: int | None = Field(None, ge=32)
    # Prompt lookup decoding: draft tokens per step copied from n-grams of the prompt and output (0: off), and
    # the longest n-gram matched. A request's `prompt_lookup_num_tokens` parameter overrides the first.
    prompt_lookup_num_tokens: int = Field(0, ge=0, le=64)
    prompt_lookup_max_ngram: int = Field(3, ge=1, le=16)
    # Our engine's decode steps through torch.compile (bf16/fp16, Llama family): faster steps for a compile
    # of ~30-75 s per graph at start-up and a second, packed copy of the weights. None ("auto", the default):
    # where it was measured to pay (`compile_by_default_reason`), true: or refuse to start, false: never.
    compile_decode: bool | None = None
    engine_options: dict[str, str] = Field(default_factory=dict)
    # Where downloads and conversions are kept (LLM_ENDPOINT_CACHE), and the optimum-intel converter that
    # turns HF directories into OpenVINO IR (LLM_ENDPOINT_OPTIMUM_CLI, else optimum-cli on PATH).
    cache_dir: Path
    optimum_cli: str | None = None

    @field_validator("rolling_batch", "dtype", mode="before")
    @classmethod
    def _alias(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            return _ALIASES[str(info.field_name)].get(v, v)  # field validators always know their field
        return v

    @field_validator("tensor_parallel_degree", mode="before")
    @classmethod
    def _tp(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "max":
            return "max"
        return v

    @field_validator("compile_decode", mode="before")
    @classmethod
    def _auto_bool(cls, v: Any) -> Any:
        if isinstance(v, str):
            return None if v.strip().lower() == "auto" else parse_bool(v)
        return v

    @field_validator("trust_remote_code", "tgi_compat", "enforce_eager", "enable_stateful_sessions", "expose_model_url",
                     "enable_auto_tool_choice", mode="before")
    @classmethod
    def _strict_bool(cls, v: Any) -> Any:
        return parse_bool(v) if isinstance(v, str) else v

    @property
    def attention_sinks_enabled(self) -> bool:
        return self.attention_sinks is not None or self.attention_window is not None

    @property
    def sink_tokens(self) -> int:
        return DEFAULT_ATTENTION_SINKS if self.attention_sinks is None else self.attention_sinks

    @property
    def window_tokens(self) -> int:
        return DEFAULT_ATTENTION_WINDOW if self.attention_window is None else self.attention_window

    @property
    def effective_max_rolling_batch_size(self) -> int:
        """LMI's recommender default: 256 for vLLM-style engines, else 32."""
        if self.max_rolling_batch_size is not None:
            return self.max_rolling_batch_size
        return 256 if self.rolling_batch in (RollingBatch.VLLM, RollingBatch.TRTLLM) else 32
