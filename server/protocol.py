"""Wire schemas: LMI (TGI-like) and OpenAI chat request bodies, and what a formatter needs to know.

Only shapes and per-field bounds live here; cross-field rules and tokenization live in request_parser.
Unknown fields are accepted and ignored, as LMI does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from llm_endpoint.backends.config import ResponseFormat

# Bounds that turn absurd numbers into a clear 424 rather than an engine crash.
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
MAX_TOP_N_TOKENS = 20

Number = StrictInt | StrictFloat


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LmiParameters(_Lenient):
    """`parameters` of an LMI request (LMI's input schema, djl-serving docs `lmi_input_output_schema.md`)."""

    do_sample: StrictBool | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    temperature: Number | None = Field(None, ge=0, le=100)
    top_k: StrictInt | None = Field(None, ge=-1)
    top_p: Number | None = Field(None, gt=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0, le=100)
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    details: StrictBool | None = None
    return_full_text: StrictBool | None = None
    stop_sequences: list[StrictStr] | StrictStr | None = None
    decoder_input_details: StrictBool | None = None
    top_n_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    ignore_eos_token: StrictBool | None = None


class LmiRequest(_Lenient):
    inputs: StrictStr
    parameters: LmiParameters = Field(default_factory=LmiParameters)
    stream: StrictBool = False


class ChatContentPart(_Lenient):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[ChatContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Lenient):
    """OpenAI chat-completions body (the subset that maps onto text generation)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(None, gt=0, le=100)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    n: StrictInt = Field(1, ge=1, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False


@dataclass(frozen=True)
class OutputOptions:
    """Everything a formatter needs about the request; formatters see nothing of engines or HTTP."""

    kind: Literal["lmi", "chat"]
    stream: bool
    formatter: ResponseFormat
    inputs: str = ""  # the prompt text (LMI `details.inputs`, `return_full_text`)
    details: bool = False
    return_full_text: bool = False
    tgi_compat: bool = False
    # chat only
    model: str = "lmi"
    logprobs: bool = False
    top_logprobs: int = 0
    include_usage: bool = False

    @property
    def shows_token_logprobs(self) -> bool:
        """Whether the response carries each generated token's log-prob (engines may skip them otherwise):
        every LMI stream line and `details` do, a plain LMI JSON body does not; chat only with `logprobs`."""
        if self.kind == "chat":
            return self.logprobs
        return self.formatter != "json" or self.details
