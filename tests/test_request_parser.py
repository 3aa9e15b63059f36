"""RequestParser decisions that no response shows directly (what it asks the engine for), and the numbers it
refuses before any engine sees them."""

from __future__ import annotations

from typing import Any

import pytest

from llm_endpoint.server.request_parser import InvalidRequest, RequestParser, decode_body
from tests.conftest import make_config

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("payload", "config", "accept", "expected"),
    [
        ({"inputs": "Hi"}, {}, None, False),  # {"generated_text"} only
        ({"inputs": "Hi", "parameters": {"details": True}}, {}, None, True),
        ({"inputs": "Hi", "stream": True}, {}, None, True),  # every streamed token object has a log_prob
        ({"inputs": "Hi"}, {"output_formatter": "jsonlines"}, None, True),  # a configured jsonlines streams
        ({"inputs": "Hi"}, {}, "application/jsonlines", True),
        ({"inputs": "Hi"}, {"tgi_compat": True}, None, True),  # TGI bodies default to details
        ({"inputs": "Hi", "parameters": {"details": False}}, {"tgi_compat": True}, None, False),
        ({"messages": CHAT}, {}, None, False),
        ({"messages": CHAT, "stream": True}, {}, None, False),
        ({"messages": CHAT, "logprobs": True}, {}, None, True),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 2, "stream": True}, {}, None, True),
    ],
)
def test_token_logprobs_asked_only_when_the_response_shows_them(
    tokenizer: Any, payload: dict, config: dict, accept: str | None, expected: bool
) -> None:
    parser = RequestParser(make_config(model_id="demo", **config), tokenizer, max_model_len=2048)
    parsed = parser.parse(payload, "r1", accept=accept)
    assert parsed.generation.params.token_logprobs is expected


# ---- numbers that can never sample: refused with a 424 naming the field and its allowed range ----------------

LMI_TEMPERATURE = "must be 0 (greedy) or between 0.01 and 100"
CHAT_TEMPERATURE = "must be 0 (greedy) or between 0.01 and 2"
PENALTY = "must be between 0.01 and 100"
FINITE = "must be a finite number"


def _lmi_body(field: str, raw: str) -> bytes:
    """An LMI body with `raw` as the field's JSON text, verbatim (NaN and Infinity are literals Python's json
    accepts), decoded as the server decodes it."""
    return f'{{"inputs": "Hi", "parameters": {{"do_sample": true, "{field}": {raw}}}}}'.encode()


def _chat_body(field: str, raw: str) -> bytes:
    return f'{{"messages": [{{"role": "user", "content": "Hi"}}], "{field}": {raw}}}'.encode()


def _parse(tokenizer: Any, body: bytes):
    parser = RequestParser(make_config(model_id="demo"), tokenizer, max_model_len=2048)
    return parser.parse(decode_body(body, "application/json"), "r1")


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        (_lmi_body("temperature", "1e-45"), "'parameters.temperature'", LMI_TEMPERATURE),
        (_lmi_body("temperature", "0.009"), "'parameters.temperature'", LMI_TEMPERATURE),
        (_lmi_body("temperature", "-1"), "'parameters.temperature'", LMI_TEMPERATURE),
        (_lmi_body("temperature", "-1e-45"), "'parameters.temperature'", LMI_TEMPERATURE),
        (_lmi_body("temperature", "100.001"), "'parameters.temperature'", LMI_TEMPERATURE),
        (_lmi_body("temperature", "NaN"), "'parameters.temperature'", FINITE),
        (_lmi_body("temperature", "Infinity"), "'parameters.temperature'", FINITE),
        (_lmi_body("temperature", "-Infinity"), "'parameters.temperature'", FINITE),
        (_lmi_body("temperature", "1e999"), "'parameters.temperature'", FINITE),  # json reads it as inf
        (_lmi_body("repetition_penalty", "1e-40"), "'parameters.repetition_penalty'", PENALTY),
        (_lmi_body("repetition_penalty", "0"), "'parameters.repetition_penalty'", PENALTY),
        (_lmi_body("repetition_penalty", "-2"), "'parameters.repetition_penalty'", PENALTY),
        (_lmi_body("repetition_penalty", "100.5"), "'parameters.repetition_penalty'", PENALTY),
        (_lmi_body("repetition_penalty", "NaN"), "'parameters.repetition_penalty'", FINITE),
        (_lmi_body("top_p", "NaN"), "'parameters.top_p'", FINITE),
        (_lmi_body("top_p", "Infinity"), "'parameters.top_p'", FINITE),
        (_chat_body("temperature", "1e-45"), "'temperature'", CHAT_TEMPERATURE),
        (_chat_body("temperature", "2.5"), "'temperature'", CHAT_TEMPERATURE),
        (_chat_body("temperature", "NaN"), "'temperature'", FINITE),
        (_chat_body("repetition_penalty", "1e-40"), "'repetition_penalty'", PENALTY),
        (_chat_body("repetition_penalty", "Infinity"), "'repetition_penalty'", FINITE),
        (_chat_body("top_p", "-Infinity"), "'top_p'", FINITE),
        (_chat_body("frequency_penalty", "NaN"), "'frequency_penalty'", FINITE),
        (_chat_body("presence_penalty", "Infinity"), "'presence_penalty'", FINITE),
    ],
    ids=lambda v: v.decode() if isinstance(v, bytes) else None,
)
def test_numbers_that_cannot_sample_are_refused(tokenizer: Any, body: bytes, field: str, expected: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _parse(tokenizer, body)
    message = str(caught.value)
    assert caught.value.status == 424
    assert message.startswith(f"Invalid request payload: {field} {expected} (got "), message


def test_the_refusal_shows_the_value_sent(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequest, match=r"'parameters\.temperature' must be 0 \(greedy\) or between 0\.01 and "
                                             r"100 \(got 1e-45\)$"):
        _parse(tokenizer, _lmi_body("temperature", "1e-45"))


@pytest.mark.parametrize(
    ("body", "temperature", "do_sample"),
    [
        (b'{"inputs": "Hi", "parameters": {"temperature": 0}}', 1.0, False),  # 0 is greedy
        (b'{"inputs": "Hi", "parameters": {"temperature": 0.0, "do_sample": true}}', 1.0, False),
        (b'{"inputs": "Hi", "parameters": {"temperature": -0.0}}', 1.0, False),
        (b'{"inputs": "Hi", "parameters": {"temperature": 0.01}}', 0.01, True),
        (b'{"inputs": "Hi", "parameters": {"temperature": 100}}', 100.0, True),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}', 1.0, False),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.01}', 0.01, True),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 2}', 2.0, True),
    ],
)
def test_temperature_boundaries_are_accepted(tokenizer: Any, body: bytes, temperature: float, do_sample: bool) -> None:
    params = _parse(tokenizer, body).generation.params
    assert (params.temperature, params.do_sample) == (temperature, do_sample)


@pytest.mark.parametrize("value", ["0.01", "1", "100"])
@pytest.mark.parametrize("make_body", [_lmi_body, _chat_body])
def test_repetition_penalty_boundaries_are_accepted(tokenizer: Any, make_body, value: str) -> None:
    params = _parse(tokenizer, make_body("repetition_penalty", value)).generation.params
    assert params.repetition_penalty == float(value)


# ---- text no tokenizer can take, anywhere in the body ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "'model'"),
        (b'{"model": "\\ud800", "stream": true, "messages": [{"role": "user", "content": "hi"}]}', "'model'"),
        (b'{"inputs": "hi", "parameters": {"stop_sequences": ["ok", "\\uDC01"]}}', "'parameters.stop_sequences.1'"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff!"}]}]}',
         "'messages.0.content.0.text'"),
        (b'{"inputs": "hi", "\\ud800": 1}', "'a key in payload'"),
    ],
)
def test_an_unpaired_surrogate_anywhere_is_refused_naming_where(body: bytes, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        decode_body(body, "application/json")
    assert field in str(err.value) and "unpaired surrogate" in str(err.value)
    str(err.value).encode("utf-8")  # the message itself can be sent


def test_a_surrogate_pair_and_an_escaped_backslash_are_text() -> None:
    payload = decode_body(b'{"inputs": "smile \\ud83d\\ude00 and \\\\ud800"}', "application/json")
    assert payload["inputs"] == "smile \U0001f600 and \\ud800"


# ---- the prompt's byte length is checked before it is tokenized ------------------------------------------------


class _CountingTokenizer:
    """The real tokenizer, counting the characters it is asked to tokenize."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.tokenized_chars = 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.tokenized_chars += len(text)
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def test_longest_token_bytes_is_the_vocabularys_true_maximum(tokenizer: Any) -> None:
    from llm_endpoint.server.request_parser import longest_token_bytes

    exact = max(len(tokenizer.convert_tokens_to_string([t]).encode("utf-8")) for t in tokenizer.get_vocab())
    assert longest_token_bytes(tokenizer) == exact


@pytest.mark.parametrize("kind", ["lmi", "chat"])
def test_a_prompt_too_long_in_bytes_is_refused_without_tokenizing_it(tokenizer: Any, kind: str) -> None:
    counting = _CountingTokenizer(tokenizer)
    parser = RequestParser(make_config(model_id="demo"), counting, max_model_len=2048)
    text = "word " * 1_000_000  # 5 MB: far more than 2048 tokens can spell
    payload = {"inputs": text} if kind == "lmi" else {"messages": [{"role": "user", "content": text}]}
    with pytest.raises(InvalidRequest) as err:
        parser.parse(payload, "r1")
    assert "Input too long" in str(err.value) and "option.max_model_len is 2048" in str(err.value)
    assert counting.tokenized_chars == 0


def test_a_prompt_within_the_byte_bound_is_still_checked_in_tokens(tokenizer: Any) -> None:
    counting = _CountingTokenizer(tokenizer)
    parser = RequestParser(make_config(model_id="demo"), counting, max_model_len=64)
    with pytest.raises(InvalidRequest) as err:
        parser.parse({"inputs": "word " * 100}, "r1")  # 500 bytes, 100 tokens
    assert "the prompt has 100 tokens" in str(err.value) or "the prompt has 101 tokens" in str(err.value)
    assert counting.tokenized_chars == 500


def test_with_attention_sinks_a_long_prompt_is_not_refused_by_bytes(tokenizer: Any) -> None:
    parser = RequestParser(make_config(model_id="demo", attention_window=64), tokenizer, max_model_len=64)
    parsed = parser.parse({"inputs": "word " * 2000}, "r1")
    assert len(parsed.generation.prompt_token_ids) >= 2000


# ---- chat templates: rendered as transformers renders them, within a budget ----------------------------------


def test_a_template_that_runs_past_its_budget_is_a_424(tokenizer: Any) -> None:
    from llm_endpoint.server.chat_template import ChatTemplate

    parser = RequestParser(make_config(model_id="demo", chat_template_timeout=0.2), tokenizer, max_model_len=2048)
    # A template whose loops run over the conversation; a long conversation would make it run for hours.
    parser.chat_template = ChatTemplate(
        "{% for m in messages %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        "{{ m.content }}{% endfor %}", tokenizer.special_tokens_map)
    with pytest.raises(InvalidRequest) as err:
        parser.parse({"messages": CHAT}, "r1")
    assert "chat_template_timeout=0.2 s" in str(err.value)


def test_template_syntax_in_user_content_is_only_text(tokenizer: Any) -> None:
    parser = RequestParser(make_config(model_id="demo"), tokenizer, max_model_len=2048)
    content = "{{ 7*7 }}{% for x in range(10**9) %}{% endfor %}"
    parsed = parser.parse({"messages": [{"role": "user", "content": content}]}, "r1")
    assert content in parsed.generation.prompt and "49" not in parsed.generation.prompt
