"""HTTP body -> (GenerationRequest, OutputOptions): decoding, schema validation, defaults, tokenization.

Every rejection is an `InvalidRequest` whose message says what was wrong and what is expected; the
server turns it into LMI's `{"error": ..., "code": 424}`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from llm_endpoint.backends.config import ConfigError, ResponseFormat, ServingConfig
from llm_endpoint.backends.errors import prompt_too_long
from llm_endpoint.backends.types import GenerationRequest, SamplingParams
from llm_endpoint.server.chat_template import ChatTemplate, ChatTemplateError, TemplateBudgetExceeded
from llm_endpoint.server.protocol import (
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    LmiRequest,
    OutputOptions,
    ResponseFormatSpec,
)
from llm_endpoint.server.sessions import History, Turn
from llm_endpoint.server.tool_calls import ToolCallFormat, constrained_schema

MAX_STOP_SEQUENCE_CHARS = 512
_ACCEPT_FORMATTERS: dict[str, ResponseFormat] = {
    "application/json": "json",
    "application/jsonlines": "jsonlines",
    "application/x-jsonlines": "jsonlines",
    "text/event-stream": "sse",
}
# curl -d without -H sends form-urlencoded; LMI curl scripts that forget the header still work.
_JSON_TYPES = ("application/json", "application/x-json", "text/json", "application/x-www-form-urlencoded")


class InvalidRequest(Exception):
    """The payload is unusable; the message is shown to the client with HTTP 424."""

    def __init__(self, message: str, status: int = 424) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ParsedRequest:
    generation: GenerationRequest
    output: OutputOptions
    turn: Turn | None = None  # within a stateful session: what this request adds to its history


def decode_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """LMI decodes a missing content type as JSON and an empty body as `{"inputs": ""}`."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media not in _JSON_TYPES and not media.endswith("+json"):
        raise InvalidRequest(f"unsupported Content-Type {media!r}: expected application/json")
    if not body.strip():
        return {"inputs": ""}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start}): expected a UTF-8 JSON object") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): expected a JSON object"
        ) from None
    except RecursionError:
        raise InvalidRequest("request body nests too deeply: expected a flat JSON object") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's 4300-digit conversion limit
        raise InvalidRequest(f"request body has an unusable value ({exc}): expected ordinary JSON numbers") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"payload is a JSON {type(payload).__name__}: expected a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        try:
            _check_unicode(payload, "")
        except RecursionError:
            raise InvalidRequest("request body nests too deeply: expected a flat JSON object") from None
    return payload


# JSON can escape a lone UTF-16 surrogate ("\\ud800"): such a string can be neither tokenized nor written back
# out, wherever it sits (a prompt, the `model` echoed in a reply, a stop sequence). Only escapes can produce
# one (the body is strict UTF-8), so bodies without such an escape skip the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(value: Any, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"'{path or 'payload'}' contains an unpaired surrogate {value[exc.start]!r} at character {exc.start}: "
                "expected valid Unicode text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, f"a key in {path or 'payload'}")
            _check_unicode(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}")


# pydantic names union branches in error locations ("temperature.int"); users know only the field.
_UNION_BRANCH = re.compile(r"^(int|float|str|bool|list\[.*\]|dict\[.*\]|function-.*)$")
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
    "list_type": "a list", "bool_type": "true or false", "dict_type": "a JSON object",
    "model_type": "a JSON object", "model_attributes_type": "a JSON object",
}


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not _UNION_BRANCH.match(str(p))) or "payload"


def _validation_message(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = _field(err["loc"])
    if err["type"] == "missing":
        return f"Invalid request payload: '{loc}' is required"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(str(got)) < 80 else type(got).__name__
    same_field = [e for e in errors if _field(e["loc"]) == loc]
    if err["type"] == "out_of_range":  # protocol's range checks word their own "must be ..."
        return f"Invalid request payload: '{loc}' {err['msg']} (got {shown})"
    if any(e["type"] == "finite_number" for e in same_field):  # NaN, Infinity, -Infinity, 1e999
        return f"Invalid request payload: '{loc}' must be a finite number (got {shown})"
    # A value that fits no branch of a union: list what each branch would have taken.
    kinds = list(dict.fromkeys(_EXPECTED[e["type"]] for e in same_field if e["type"] in _EXPECTED))
    if len(same_field) > 1 and kinds:
        if kinds == ["an integer", "a number"]:
            kinds = ["a number"]
        return f"Invalid request payload: '{loc}' must be {' or '.join(kinds)} (got {shown})"
    return f"Invalid request payload: '{loc}': {err['msg']} (got {shown})"


def _validate(model: type[BaseModel], payload: dict[str, Any]) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc)) from None


def _stop_list(value: str | Sequence[str] | None, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else tuple(value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"'{field}' has {len(stops)} entries: at most {MAX_STOP_SEQUENCES} are allowed")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidRequest(f"'{field}' entries must be non-empty strings of at most {MAX_STOP_SEQUENCE_CHARS} characters")
    return stops


# OpenAI fields that would change what the answer is or looks like, and that this server does not implement:
# a request using one gets a 424 naming it rather than a plain answer that silently ignored it. Each maps to the
# values that ask for nothing (absent or null always does).
_UNIMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "functions": ([],),  # OpenAI's deprecated form of `tools`
    "function_call": ("none",),
    "logit_bias": ({},),
    "suffix": ("",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
}
TOOLS_NEED_TEMPLATE = "set option.chat_template to a template that renders them"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's (and vLLM's) default max_tokens for completions


_COMPLETION_ONLY_UNIMPLEMENTED = ("tools", "tool_choice")  # completions have no messages to hold calls


def _refuse_unimplemented(payload: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    for name in extra:
        if payload.get(name) not in (None, [], "none"):
            raise InvalidRequest(f"'{name}' is not supported on completions: expected it absent or null "
                                 "(chat completions take tools)")
    for name, neutral in _UNIMPLEMENTED.items():
        value = payload.get(name)
        if value is not None and value not in neutral:
            raise InvalidRequest(f"'{name}' is not supported by this server: expected it absent or null")


ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's json_object, as a schema every engine's grammar compiler takes


def json_schema_text(schema: dict[str, Any] | str, field: str) -> str:
    """A JSON schema (an object, or JSON text of one) as compact text, once its metaschema accepts it; what is
    wrong with it is a 424 naming `field`. Keys keep their order: every engine's grammar writes properties in
    the order the schema lists them, as OpenAI's strict mode does (and a tool call's name must come before its
    arguments for the call to stream named)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"'{field}' is not valid JSON ({exc}): expected a JSON schema") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{field}' is a JSON {type(schema).__name__}: expected a JSON schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = exc.json_path if exc.path else "the top level"
        raise InvalidRequest(f"'{field}' is not a valid JSON schema: {exc.message} (at {where})") from None
    except (RecursionError, jsonschema.exceptions.UnknownType) as exc:
        raise InvalidRequest(f"'{field}' is not a usable JSON schema: {exc}") from None
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _response_format(spec: ResponseFormatSpec | None) -> str | None:
    """OpenAI's response_format as the schema the output must match (None: free text)."""
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return json_schema_text(ANY_JSON_OBJECT, "response_format")
    if spec.json_schema is None:
        raise InvalidRequest("'response_format.json_schema' is required when 'response_format.type' is 'json_schema'")
    return json_schema_text(spec.json_schema.schema_, "response_format.json_schema.schema")


def _sampling_params(
    *, max_new_tokens: int, do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None,
    repetition_penalty: float | None, seed: int | None, stop_sequences: tuple[str, ...], ignore_eos: bool,
    top_n_tokens: int, output: OutputOptions, prompt_logprobs: bool = False, prompt_lookup_num_tokens: int = 0,
    frequency_penalty: float | None = None, presence_penalty: float | None = None, json_schema: str | None = None,
    ignore_eos_field: str = "ignore_eos",
) -> SamplingParams:
    """The one mapping of validated wire values onto SamplingParams, for LMI and chat bodies alike: absent
    values take their neutral defaults, temperature 0 leaves 1.0 (greedy decides), unseeded requests get a seed."""
    if json_schema is not None and ignore_eos:  # the grammar ends the output; generating past it has no meaning
        raise InvalidRequest(f"'{ignore_eos_field}' cannot be combined with structured output: drop one of them")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=float(temperature) if temperature else 1.0,
        top_k=max(top_k or 0, 0),
        top_p=float(top_p) if top_p is not None else 1.0,
        repetition_penalty=float(repetition_penalty) if repetition_penalty is not None else 1.0,
        frequency_penalty=float(frequency_penalty or 0),
        presence_penalty=float(presence_penalty or 0),
        seed=seed if seed is not None else random.getrandbits(63),
        stop_sequences=stop_sequences,
        ignore_eos=ignore_eos,
        top_n_tokens=top_n_tokens,
        prompt_logprobs=prompt_logprobs,
        token_logprobs=output.shows_token_logprobs,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        json_schema=json_schema,
    )


def longest_token_bytes(tokenizer: Any) -> int:
    """The most bytes of text one token stands for. A token's vocabulary spelling has at least as many UTF-8
    bytes as the text it decodes to (byte-level BPE spells a byte as one or two; sentencepiece's '▁' and
    '<0x0A>' are longer than a space and a byte), so entries are decoded longest spelling first, and the
    search stops once no remaining spelling could beat the best decoded length."""
    spellings = sorted(tokenizer.get_vocab(), key=lambda tok: len(tok.encode("utf-8")), reverse=True)
    best = 1
    for token in spellings:
        if len(token.encode("utf-8")) <= best:
            break
        best = max(best, len(tokenizer.convert_tokens_to_string([token]).encode("utf-8")))
    return best


class RequestParser:
    """Holds what parsing needs: the config (defaults, limits) and the tokenizer."""

    def __init__(
        self, config: ServingConfig, tokenizer: Any, max_model_len: int, backend_name: str = "scheduler",
        supports_top_tokens: bool = True, prompt_lookup_refusal: Callable[[int], str | None] | None = None,
    ) -> None:
        """`prompt_lookup_refusal(k)`: why the backend cannot serve a request's own prompt_lookup_num_tokens=k
        (None when it can; unset: any value)."""
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # Attention sinks lift every length limit: a prompt of any length streams through the sink cache.
        self.unbounded = config.attention_sinks_enabled
        self.backend_name = backend_name
        self.supports_top_tokens = supports_top_tokens
        self.prompt_lookup_refusal = prompt_lookup_refusal or (lambda k: None)
        try:
            self.chat_template = ChatTemplate.of(tokenizer, config.chat_template)
        except ChatTemplateError as exc:
            raise ConfigError(str(exc)) from None
        # No prompt of more bytes than this fits in max_model_len tokens (bounded mode): every token spells at
        # most _longest_token bytes. With sinks, a rendered chat may be as long as a request body allows.
        self._longest_token = longest_token_bytes(tokenizer)
        self._max_prompt_chars = (
            2 * config.max_request_size if self.unbounded else self._longest_token * (max_model_len - 1)
        )

    def _prompt_lookup(self, requested: int | None, field: str) -> int:
        """Draft tokens per step for a request: its own value if it gives one the backend can serve, else the
        option's."""
        if requested is None:
            return self.config.prompt_lookup_num_tokens
        refusal = self.prompt_lookup_refusal(requested)
        if refusal:
            raise InvalidRequest(f"'{field}'={requested} is not supported by the {self.backend_name} backend: {refusal}")
        return requested

    def _check_top_tokens(self, count: int, field: str) -> None:
        if count and not self.supports_top_tokens:
            raise InvalidRequest(
                f"'{field}' is not supported by the {self.backend_name} backend (it reports only the chosen "
                "token's log-prob; option.rolling_batch=scheduler and vllm report alternatives): expected 0 or absent"
            )

    def parse(
        self, payload: dict[str, Any], request_id: str, force_stream: bool = False, accept: str | None = None,
        history: History | None = None,
    ) -> ParsedRequest:
        """`force_stream`: stream whatever the body says (InvokeEndpointWithResponseStream); `accept`: the
        client's preferred media type, which picks the formatter when it names one we have; `history`: the
        stateful session this request continues, whose history comes before the request's own input."""
        wanted = _ACCEPT_FORMATTERS.get((accept or "").split(";", 1)[0].strip().lower())
        if "messages" in payload:
            return self._parse_chat(payload, request_id, force_stream, wanted, history)
        if "prompt" in payload and "inputs" not in payload:  # an OpenAI completions body, as LMI's async mode reads it
            return self._parse_completion(payload, request_id, force_stream, wanted, history)
        return self._parse_lmi(payload, request_id, force_stream, wanted, history)

    def _too_long_in_bytes(self, size: str) -> str:
        return (f"Input too long: the prompt has {size} bytes, more than {self.max_model_len - 1} tokens of this model "
                f"can hold (its longest token spells {self._longest_token} bytes; option.max_model_len is "
                f"{self.max_model_len})")

    def _tokens(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        if not self.unbounded:  # refuse what cannot fit before paying for its tokenization
            size = len(text.encode("utf-8"))
            if size > self._max_prompt_chars:
                raise InvalidRequest(self._too_long_in_bytes(str(size)))
        ids = tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise InvalidRequest("the prompt tokenizes to nothing: expected non-empty text")
        if len(ids) >= self.max_model_len and not self.unbounded:
            raise InvalidRequest(prompt_too_long(len(ids), self.max_model_len))
        return ids

    def _max_new_tokens(self, requested: int | None, default: int, prompt_len: int, field: str) -> int:
        if self.unbounded:
            return requested if requested is not None else default
        room = self.max_model_len - prompt_len
        if requested is None:
            return max(1, min(default, room))
        if requested > self.max_model_len:
            raise InvalidRequest(
                f"'{field}'={requested} exceeds option.max_model_len={self.max_model_len}: expected at most {room}"
            )
        return max(1, min(requested, room))

    def _parse_lmi(
        self, payload: dict[str, Any], request_id: str, force_stream: bool, wanted: ResponseFormat | None,
        history: History | None,
    ) -> ParsedRequest:
        if "inputs" in payload and not isinstance(payload["inputs"], str):
            raise InvalidRequest(
                f"Invalid request payload: the 'inputs' field must be a string (got {type(payload['inputs']).__name__})"
            )
        if "parameters" in payload and payload["parameters"] is not None and not isinstance(payload["parameters"], dict):
            raise InvalidRequest("Invalid request payload: the 'parameters' field must be a JSON object")
        if payload.get("parameters") is None:
            payload = {**payload, "parameters": {}}
        req: LmiRequest = _validate(LmiRequest, payload)
        if not req.inputs:
            raise InvalidRequest("Invalid request payload: the 'inputs' field must be a non-empty string")
        p = req.parameters
        stream = req.stream or force_stream
        tgi = self.config.tgi_compat
        details = p.details if p.details is not None else tgi
        default: ResponseFormat = "sse" if stream and tgi else "jsonlines" if stream else "json"
        formatter = wanted or self.config.output_formatter or default
        if force_stream and formatter == "json":  # the stream route streams token by token, whatever Accept says
            formatter = default
        if p.decoder_input_details and stream:
            raise InvalidRequest("'decoder_input_details' cannot be used with streaming: set stream to false")
        for name in ("n", "best_of", "num_beams"):
            if getattr(p, name) not in (None, 1):
                raise InvalidRequest(
                    f"'parameters.{name}'={getattr(p, name)} is not supported on LMI bodies (one sequence per "
                    "request): expected 1 or absent; OpenAI bodies (/v1/completions, /v1/chat/completions) take 'n'"
                )
        self._check_top_tokens(p.top_n_tokens or 0, "parameters.top_n_tokens")
        if history is not None and history.kind == "chat":
            raise InvalidRequest("this session holds a chat conversation: continue it with 'messages', not 'inputs'")
        prompt = (history.text if history is not None else "") + req.inputs
        ids = self._tokens(prompt, add_special_tokens=True)
        # Greedy unless do_sample or a temperature asks for sampling (LMI >= 0.32); temperature 0 is greedy.
        do_sample = p.do_sample if p.do_sample is not None else (p.temperature is not None and p.temperature > 0)
        if p.temperature == 0:
            do_sample = False
        output = OutputOptions(
            kind="lmi",
            stream=stream,
            formatter=formatter,
            inputs=req.inputs,
            details=details,
            return_full_text=bool(p.return_full_text),
            tgi_compat=tgi,
        )
        params = _sampling_params(
            max_new_tokens=self._max_new_tokens(
                p.max_new_tokens, self.config.default_max_new_tokens, len(ids), "parameters.max_new_tokens"
            ),
            do_sample=do_sample,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            seed=p.seed,
            stop_sequences=_stop_list(p.stop_sequences, "parameters.stop_sequences"),
            ignore_eos=bool(p.ignore_eos_token),
            top_n_tokens=p.top_n_tokens or 0,
            output=output,
            prompt_logprobs=bool(p.decoder_input_details),
            prompt_lookup_num_tokens=self._prompt_lookup(p.prompt_lookup_num_tokens, "parameters.prompt_lookup_num_tokens"),
            json_schema=json_schema_text(p.guided_json, "parameters.guided_json") if p.guided_json is not None else None,
            ignore_eos_field="parameters.ignore_eos_token",
        )
        turn = Turn("lmi", text=req.inputs) if history is not None else None
        return ParsedRequest(GenerationRequest(request_id, ids, params, prompt), output, turn)

    def _openai_formatter(self, stream: bool, wanted: ResponseFormat | None) -> ResponseFormat:
        """OpenAI bodies stream SSE unless JSON lines were asked for (Accept or option.output_formatter)."""
        if not stream:
            return "json"
        return "jsonlines" if (wanted or self.config.output_formatter) == "jsonlines" else "sse"

    def _parse_completion(
        self, payload: dict[str, Any], request_id: str, force_stream: bool, wanted: ResponseFormat | None,
        history: History | None,
    ) -> ParsedRequest:
        _refuse_unimplemented(payload, _COMPLETION_ONLY_UNIMPLEMENTED)
        req: CompletionRequest = _validate(CompletionRequest, payload)
        if history is not None:
            raise InvalidRequest("a stateful session continues with 'inputs' or 'messages', not a completions 'prompt'")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise InvalidRequest(
                f"'prompt' has {len(prompts)} entries: this server completes one prompt per request "
                "(send a string or a one-element list)"
            )
        prompt = prompts[0]
        if not prompt:
            raise InvalidRequest("Invalid request payload: 'prompt' must be a non-empty string")
        stream = req.stream or force_stream
        self._check_top_tokens(req.logprobs or 0, "logprobs")
        candidates = self._choices(req.n, req.best_of, stream)
        ids = self._tokens(prompt, add_special_tokens=True)
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        output = OutputOptions(
            kind="completion",
            stream=stream,
            formatter=self._openai_formatter(stream, wanted),
            inputs=prompt,
            model=req.model or self.config.model_name,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            echo=req.echo,
            n=req.n,
            candidates=candidates,
        )
        params = self._openai_sampling(
            req, self._max_new_tokens(req.max_tokens, DEFAULT_COMPLETION_TOKENS, len(ids), "max_tokens"),
            temperature, req.logprobs or 0, output,
            prompt_logprobs=req.echo and req.logprobs is not None,  # the echoed prompt's tokens come with theirs
        )
        return ParsedRequest(GenerationRequest(request_id, ids, params, prompt), output)

    def _openai_sampling(
        self, req: ChatCompletionRequest | CompletionRequest, max_new_tokens: int, temperature: float, top_n: int,
        output: OutputOptions, prompt_logprobs: bool = False,
    ) -> SamplingParams:
        """Chat and completions bodies share OpenAI's sampling fields; temperature 0 is greedy."""
        return _sampling_params(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            seed=req.seed,
            stop_sequences=_stop_list(req.stop, "stop"),
            ignore_eos=req.ignore_eos,
            top_n_tokens=top_n,
            output=output,
            prompt_logprobs=prompt_logprobs,
            prompt_lookup_num_tokens=self._prompt_lookup(req.prompt_lookup_num_tokens, "prompt_lookup_num_tokens"),
            json_schema=_response_format(req.response_format),
        )

    @staticmethod
    def _choices(n: int, best_of: int | None, stream: bool, in_session: bool = False) -> int:
        """How many candidates to generate for `n` choices (`best_of`, when given, at least n), as OpenAI
        rules: `best_of` picks after every candidate has finished, so it cannot stream."""
        candidates = n if best_of is None else best_of
        if candidates < n:
            raise InvalidRequest(f"'best_of'={best_of} must be at least 'n'={n}: it is how many candidates the n "
                                 "choices are picked from")
        if stream and candidates > n:
            raise InvalidRequest(f"'best_of'={best_of} cannot be used with streaming (the best {n} are known only "
                                 "once all have finished): set stream to false or best_of to n")
        if in_session and candidates > 1:
            raise InvalidRequest(f"'n'={n} cannot continue a stateful session (only one reply can join its "
                                 "history): expected 1 or absent")
        return candidates

    def _parse_chat(
        self, payload: dict[str, Any], request_id: str, force_stream: bool, wanted: ResponseFormat | None,
        history: History | None,
    ) -> ParsedRequest:
        _refuse_unimplemented(payload)
        req: ChatCompletionRequest = _validate(ChatCompletionRequest, payload)
        template = self.chat_template
        if template is None:
            raise InvalidRequest("this model has no chat template: send an LMI body with 'inputs' instead of 'messages'")
        messages = [self._template_message(m, i, template.supports_tools) for i, m in enumerate(req.messages)]
        tools, tool_format, tool_schema = self._tools(req, template.supports_tools)
        if history is not None and history.kind == "lmi":
            raise InvalidRequest("this session holds LMI 'inputs' text: continue it with 'inputs', not 'messages'")
        conversation = (history.messages if history is not None else []) + messages
        try:
            prompt = template.render(conversation, timeout=self.config.chat_template_timeout,
                                     max_chars=self._max_prompt_chars, tools=tools)
        except TemplateBudgetExceeded as exc:
            if exc.too_long and not self.unbounded:
                raise InvalidRequest(self._too_long_in_bytes(f"more than {self._max_prompt_chars}")) from None
            raise InvalidRequest(f"{exc}: expected fewer or shorter messages") from None
        except Exception as exc:  # template errors are the client's message structure, e.g. roles out of order
            raise InvalidRequest(f"the messages do not fit the model's chat template: {exc}") from None
        self._check_top_tokens(req.top_logprobs or 0 if req.logprobs else 0, "top_logprobs")
        stream = req.stream or force_stream
        self._choices(req.n, None, stream, in_session=history is not None)
        ids = self._tokens(prompt, add_special_tokens=False)
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        formatter = self._openai_formatter(stream, wanted)
        output = OutputOptions(
            kind="chat",
            stream=stream,
            formatter=formatter,
            inputs=prompt,
            model=req.model or self.config.model_name,
            logprobs=req.logprobs,
            top_logprobs=top_n,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            n=req.n,
            candidates=req.n,
            tool_calls=tool_format,
            max_tool_calls=None if req.parallel_tool_calls else 1,
        )
        params = self._openai_sampling(
            req, self._max_new_tokens(req.max_completion_tokens or req.max_tokens, self.max_model_len, len(ids),
                                      "max_tokens"),
            temperature, top_n, output,
        )
        if tool_schema is not None:
            params = dataclasses.replace(params, json_schema=tool_schema)
        turn = Turn("chat", messages=tuple(messages)) if history is not None else None
        return ParsedRequest(GenerationRequest(request_id, ids, params, prompt), output, turn)

    @staticmethod
    def _template_message(message: ChatMessage, index: int, supports_tools: bool) -> dict[str, Any]:
        """A message as chat templates read it (vLLM's and transformers' shape): text content; an assistant's
        calls with their arguments as objects (templates write them with `tojson`); a tool result's call id."""
        field = f"messages.{index}"
        if (message.tool_calls or message.role == "tool") and not supports_tools:
            raise InvalidRequest(f"'{field}' holds tool calls or a tool result, but the model's chat template "
                                 f"does not support tools: {TOOLS_NEED_TEMPLATE}")
        content = message.content
        out: dict[str, Any] = {
            "role": message.role,
            "content": content if isinstance(content, str) or content is None else "".join(p.text for p in content),
        }
        if message.name is not None:
            out["name"] = message.name
        if message.tool_calls:
            if message.role != "assistant":
                raise InvalidRequest(f"'{field}.tool_calls' is only for assistant messages (got role {message.role!r})")
            calls = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except (ValueError, RecursionError):  # ValueError: also an integer past Python's digit limit
                    raise InvalidRequest(f"'{field}.tool_calls.{j}.function.arguments' is not valid JSON: expected "
                                         "the call's arguments as JSON text") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            out["tool_calls"] = calls
            if content is None:
                del out["content"]  # as vLLM passes it: templates test `message.content` and skip it
        if message.role == "tool":
            if message.tool_call_id is None:
                raise InvalidRequest(f"'{field}.tool_call_id' is required for a tool message: expected the id "
                                     "of the call it answers")
            out["tool_call_id"] = message.tool_call_id
        return out

    def _tools(
        self, req: ChatCompletionRequest, supports_tools: bool
    ) -> tuple[list[dict[str, Any]] | None, ToolCallFormat | None, str | None]:
        """The tools the template renders, how the output holds calls, and the schema that constrains it to
        calls (`tool_choice` "required" or a named function); (None, None, None) for a plain chat."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise InvalidRequest("'tool_choice' needs 'tools': expected it absent or 'none' without tools")
            return None, None, None
        names = [tool.function.name for tool in req.tools]
        for i, tool in enumerate(req.tools):
            if tool.function.parameters is not None:
                json_schema_text(tool.function.parameters, f"tools.{i}.function.parameters")
            if tool.function.name in names[:i]:
                raise InvalidRequest(f"'tools.{i}.function.name' {tool.function.name!r} is given twice: expected "
                                     "unique function names")
        if choice == "none":  # OpenAI: the model answers without calling any tool
            return None, None, None
        if not supports_tools:
            raise InvalidRequest(f"'tools': the model's chat template does not support tools; {TOOLS_NEED_TEMPLATE}")
        tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
        if choice is None or choice == "auto":
            if not self.config.enable_auto_tool_choice:
                raise InvalidRequest("'tool_choice'='auto' (the default with tools) needs "
                                     "option.enable_auto_tool_choice=true on this endpoint: set it, or send "
                                     "'required' or a named function")
            return tools, self.config.tool_call_parser, None
        if req.response_format is not None and req.response_format.type != "text":
            raise InvalidRequest("'response_format' cannot be combined with 'tool_choice' 'required' or a named "
                                 "function (the output is the calls): drop one of them")
        functions = [(tool.function.name, tool.function.parameters) for tool in req.tools]
        if choice == "required":
            schema = constrained_schema(functions, req.parallel_tool_calls)
        else:
            chosen = [f for f in functions if f[0] == choice.function.name]
            if not chosen:
                raise InvalidRequest(f"'tool_choice.function.name' {choice.function.name!r} is not among 'tools' "
                                     f"(expected one of {', '.join(names)})")
            schema = constrained_schema(chosen, parallel=False)
        return tools, "json", json_schema_text(schema, "tools")

