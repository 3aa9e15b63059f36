"""Wire schemas: LMI (TGI-like), OpenAI chat and completions request bodies, and what a formatter needs to know.

Only shapes and per-field bounds live here; cross-field rules and tokenization live in request_parser.
Unknown fields are accepted and ignored, as LMI does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from llm_endpoint.backends.config import ResponseFormat

# Bounds that turn absurd numbers into a clear 424 rather than an engine crash.
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
MAX_TOP_N_TOKENS = 20
MAX_PROMPT_LOOKUP_TOKENS = 64
# OpenAI `n` and `best_of`: each candidate is a whole generation, so one request may ask for at most this many.
MAX_CHOICES = 16
# The smallest temperature that samples. Sampling divides the logits by the temperature, so a tiny one
# (1e-45) overflows them to inf and the probabilities to NaN; vLLM silently clamps anything below 0.01 up to
# it. One explicit floor, enforced here, keeps every backend identical: 0 means greedy, and anything else
# below the floor is refused with a 424 rather than silently changed by one engine and overflowing another.
MIN_TEMPERATURE = 0.01
# Repetition penalty divides (or multiplies) seen tokens' logits, so the same overflow applies to tiny values.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100

Number = StrictInt | StrictFloat


def _in_range(low: float, high: float, *, greedy_zero: bool = False) -> Callable[[float], float]:
    """A check that `low <= value <= high` (or `value == 0` with `greedy_zero`), failing with one message
    that names the whole allowed range; request_parser shows it as "'<field>' must be ... (got <value>)"."""
    allowed = f"between {low:g} and {high:g}"
    if greedy_zero:
        allowed = f"0 (greedy) or {allowed}"

    def check(value: float) -> float:
        if not (low <= value <= high or (greedy_zero and value == 0)):
            raise PydanticCustomError("out_of_range", "must be {allowed}", {"allowed": allowed})
        return value

    return check


LmiTemperature = Annotated[Number, AfterValidator(_in_range(MIN_TEMPERATURE, 100, greedy_zero=True))]
ChatTemperature = Annotated[Number, AfterValidator(_in_range(MIN_TEMPERATURE, 2, greedy_zero=True))]
RepetitionPenalty = Annotated[Number, AfterValidator(_in_range(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY))]
Choices = Annotated[StrictInt, AfterValidator(_in_range(1, MAX_CHOICES))]


class _Lenient(BaseModel):
    # JSON has no NaN or Infinity, but Python's json accepts them as literals (and 1e999 as inf): no
    # number field of any body takes them, bounded or not.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LmiParameters(_Lenient):
    """`parameters` of an LMI request (LMI's input schema, djl-serving docs `lmi_input_output_schema.md`)."""

    do_sample: StrictBool | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    temperature: LmiTemperature | None = None
    top_k: StrictInt | None = Field(None, ge=-1)
    top_p: Number | None = Field(None, gt=0, le=1)
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)  # vLLM's, in LMI's schema
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    details: StrictBool | None = None
    return_full_text: StrictBool | None = None
    stop_sequences: list[StrictStr] | StrictStr | None = None
    decoder_input_details: StrictBool | None = None
    top_n_tokens: StrictInt | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    ignore_eos_token: StrictBool | None = None
    prompt_lookup_num_tokens: StrictInt | None = Field(None, ge=0, le=MAX_PROMPT_LOOKUP_TOKENS)
    # vLLM's, in LMI's schema; several sequences per request are not served on LMI bodies (only 1 is taken).
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    num_beams: StrictInt | None = None
    # vLLM's name (its OpenAI server's extra parameter, which LMI users of vLLM know): a JSON schema, as an
    # object or as JSON text, that the output must match.
    guided_json: dict[str, Any] | StrictStr | None = None


class LmiRequest(_Lenient):
    inputs: StrictStr
    parameters: LmiParameters = Field(default_factory=LmiParameters)
    stream: StrictBool = False


class ChatContentPart(_Lenient):
    type: Literal["text"]
    text: StrictStr


FunctionName = Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Lenient):
    """A call the assistant made, as an agent sends it back: `arguments` is JSON text."""

    name: FunctionName
    arguments: StrictStr


class ToolCallSpec(_Lenient):
    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[ChatContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallSpec] | None = None  # assistant messages: the calls it made (content may be null)
    tool_call_id: StrictStr | None = None  # tool messages: the call this is the result of


class FunctionSpec(_Lenient):
    """A function the model may call; `parameters` is a JSON schema (checked by request_parser)."""

    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolSpec(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Lenient):
    name: StrictStr


class NamedToolChoice(_Lenient):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    function: NamedFunction


_TOOL_CHOICES = ("none", "auto", "required")


def _tool_choice(value: Any) -> str | NamedToolChoice | None:
    """One message naming every form `tool_choice` takes, rather than one per union branch."""
    if value is None or value in _TOOL_CHOICES:
        return value
    if isinstance(value, dict):
        try:
            return NamedToolChoice.model_validate(value)
        except ValueError:
            pass
    allowed = """'none', 'auto', 'required' or {"type": "function", "function": {"name": ...}}"""
    raise PydanticCustomError("out_of_range", "must be {allowed}", {"allowed": allowed})


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Lenient):
    """`response_format.json_schema`: OpenAI's named schema; `strict` or not, the output is constrained to it."""

    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormatSpec(_Lenient):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _OpenAIRequest(_Lenient):
    """What OpenAI's chat and (legacy) completions bodies share; `user` is accepted and ignored."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: ChatTemperature | None = None
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    repetition_penalty: RepetitionPenalty | None = None
    n: Choices = 1
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    prompt_lookup_num_tokens: StrictInt | None = Field(None, ge=0, le=MAX_PROMPT_LOOKUP_TOKENS)
    response_format: ResponseFormatSpec | None = None


class ChatCompletionRequest(_OpenAIRequest):
    """OpenAI chat-completions body (the subset that maps onto text generation)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    tools: list[ToolSpec] | None = None
    tool_choice: Annotated[Any, AfterValidator(_tool_choice)] = None
    parallel_tool_calls: StrictBool = True


class CompletionRequest(_OpenAIRequest):
    """OpenAI (legacy) completions body: `logprobs` is the number of alternatives per token, `echo` puts the
    prompt before the completion."""

    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    echo: StrictBool = False
    best_of: Choices | None = None


@dataclass(frozen=True)
class OutputOptions:
    """Everything a formatter needs about the request; formatters see nothing of engines or HTTP."""

    kind: Literal["lmi", "chat", "completion"]
    stream: bool
    formatter: ResponseFormat
    inputs: str = ""  # the prompt text (LMI `details.inputs`, `return_full_text`)
    details: bool = False
    return_full_text: bool = False
    tgi_compat: bool = False
    # OpenAI chat and completions only
    model: str = "lmi"
    logprobs: bool = False
    top_logprobs: int = 0
    include_usage: bool = False
    echo: bool = False  # completions: the prompt comes before the completion
    # chat with tools: how the output holds its calls ("hermes": tagged in text, "json": a constrained JSON
    # array of calls, nothing else), and how many calls it may make (None: any number)
    tool_calls: Literal["hermes", "json"] | None = None
    max_tool_calls: int | None = None
    n: int = 1  # OpenAI: the choices the response holds
    candidates: int = 1  # ... and how many were generated to pick them from (`best_of`; at least n)

    @property
    def shows_token_logprobs(self) -> bool:
        """Whether the response carries each generated token's log-prob (engines may skip them otherwise):
        every LMI stream line and `details` do, a plain LMI JSON body does not; OpenAI bodies only with
        `logprobs`, or when `best_of` must rank candidates by them."""
        if self.kind != "lmi":
            return self.logprobs or self.candidates > self.n  # best_of ranks candidates by their log-probs
        return self.formatter != "json" or self.details
