"""OpenAI tool calling: tools rendered by a tool-capable chat template (option.chat_template), calls parsed from
the output into `tool_calls` (whole and streamed as deltas), `required` and named choices held to valid calls
by constrained decoding on every backend, agents' follow-up turns, and the 424s for what cannot be served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests
from openai.lib.streaming.chat import ChatCompletionStreamState

from llm_endpoint.backends.config import ConfigError
from llm_endpoint.backends.types import FinishReason, Token, TokenEvent
from llm_endpoint.server.formatters import make_formatter
from llm_endpoint.server.protocol import OutputOptions
from llm_endpoint.server.request_parser import InvalidRequest, RequestParser
from llm_endpoint.server.tool_calls import CallArguments, CallStart, Content, Piece, ToolCallParser
from tests.conftest import RunningServer, ServerPool, make_config

# A ChatML template in the manner of Hermes/Qwen2.5: the tools as JSON in the system prompt, the assistant's
# calls as <tool_call> blocks, tool results as <tool_response> blocks in a user turn.
TOOL_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call, return a JSON object within <tool_call></tool_call> tags:\\n<tool_call>\\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content %}{{- message.content }}{%- endif %}
{%- for call in message.tool_calls or [] %}
{{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson)
    + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
BUDGET = 60  # tokens: far more than a call needs, so a valid call ends by itself
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="session")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "tools.jinja"
    path.write_text(TOOL_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture
def tool_server(servers: ServerPool, backend: str, template_file: Path) -> RunningServer:
    return servers.get(backend, chat_template=str(template_file), enable_auto_tool_choice="true")


@pytest.fixture
def oai(tool_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", timeout=120, max_retries=0)


def assert_valid_call(name: str, arguments: str, allowed: tuple[str, ...] = ("get_weather",)) -> None:
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


# ---- against a real server, on every backend --------------------------------------------------------------------


def test_named_tool_choice_is_a_valid_call(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED,
                                        max_tokens=BUDGET, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert_valid_call(call.function.name, call.function.arguments)


def test_required_tool_choice_calls_one_of_the_tools(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
                                        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                                        max_tokens=BUDGET, temperature=1.0, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert_valid_call(call.function.name, call.function.arguments, ("get_weather", "get_time"))


def test_streamed_deltas_assemble_to_the_same_call(oai: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "m", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                            "max_tokens": BUDGET, "temperature": 0}
    whole = oai.chat.completions.create(**body).choices[0].message.tool_calls[0]
    chunks = list(oai.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # nothing of the call leaks as text
    fragments = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(fragments) > 2  # the name, then the arguments as they are generated
    assert {f.index for f in fragments} == {0}
    assert fragments[0].id.startswith("call_") and fragments[0].function.name == whole.function.name
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert arguments == whole.function.arguments
    assert_valid_call(fragments[0].function.name, arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    state = ChatCompletionStreamState()  # the openai client's own accumulation of a stream
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    [call] = final.message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == (fragments[0].id, whole.function.name, arguments)


def test_litellm_rebuilds_a_streamed_call(tool_server: RunningServer) -> None:
    import litellm

    chunks = list(litellm.completion(model="openai/m", api_base=tool_server.url + "/v1", api_key="x", messages=ASK,
                                     tools=[WEATHER], tool_choice=NAMED, max_tokens=BUDGET, temperature=0,
                                     stream=True))
    message = litellm.stream_chunk_builder(chunks).choices[0].message
    [call] = message.tool_calls
    assert_valid_call(call.function.name, call.function.arguments)


def test_follow_up_turn_with_the_tool_result(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                        max_tokens=BUDGET, temperature=0).choices[0].message
    call = first.tool_calls[0]
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    reply = oai.chat.completions.create(model="m", messages=follow_up, tools=[WEATHER], tool_choice="none",
                                        max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert not choice.message.tool_calls
    alone = oai.chat.completions.create(model="m", messages=ASK, max_tokens=1).usage.prompt_tokens
    assert reply.usage.prompt_tokens > alone + 30  # the call and its result were rendered into the prompt


def test_auto_tool_choice_is_a_call_or_plain_text(oai: openai.OpenAI) -> None:
    """The demo model decides; whatever it writes, no tag text is left in the content."""
    reply = oai.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=BUDGET, temperature=0)
    choice = reply.choices[0]
    assert "<tool_call>" not in (choice.message.content or "")
    if choice.finish_reason != "length":  # a call cut off by max_tokens has what arguments it got
        assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
        for call in choice.message.tool_calls or []:
            assert call.function.name and json.loads(call.function.arguments) is not None


def _post(server: RunningServer, **body: Any) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 8, **body},
                         timeout=60)


def _assert_424(res: requests.Response, *words: str) -> None:
    assert res.status_code == 424, res.text
    assert res.json()["code"] == 424
    for word in words:
        assert word in res.json()["error"], res.text


def test_the_demo_models_template_refuses_tools(server: RunningServer) -> None:
    _assert_424(_post(server, tools=[WEATHER], tool_choice="required"), "does not support tools",
                "option.chat_template")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    _assert_424(_post(server, messages=messages), "'messages.1'", "does not support tools")
    # tool_choice none: a plain answer, as OpenAI's semantics say
    assert _post(server, tools=[WEATHER], tool_choice="none").status_code == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         ("'tool_choice.function.name'", "get_weather")),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
          "tool_choice": "required"}, ("'tools.0.function.parameters'",)),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, ("'tools.0.function.name'",)),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, ("'tools.1.function.name'", "twice")),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         ("'response_format'",)),
        ({"tool_choice": "required"}, ("'tool_choice'", "needs 'tools'")),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, ("'tool_choice'",)),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
         ("'messages.1.tool_calls.0.function.arguments'",)),
        ({"messages": [*ASK, {"role": "tool", "content": "21 C"}]}, ("'messages.1.tool_call_id'",)),
    ],
)
def test_bad_tool_requests_are_424_naming_the_field(tool_server: RunningServer, body: dict, words: tuple) -> None:
    _assert_424(_post(tool_server, **body), *words)


def test_auto_needs_enable_auto_tool_choice(tokenizer: Any) -> None:
    """Without the option, `auto` (given or by default) is refused rather than answered without reading calls."""
    parser = RequestParser(make_config(model_id="m", chat_template=TOOL_TEMPLATE), tokenizer, 2048)
    for choice in ({}, {"tool_choice": "auto"}):
        with pytest.raises(InvalidRequest, match=r"option.enable_auto_tool_choice=true") as err:
            parser.parse({"messages": ASK, "tools": [WEATHER], **choice}, "r")
        assert err.value.status == 424


def test_lmi_chat_body_on_invocations_takes_tools(tool_server: RunningServer) -> None:
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": NAMED, "max_tokens": BUDGET, "temperature": 0}
    res = requests.post(tool_server.url + "/invocations", json=body, timeout=120)
    assert res.status_code == 200, res.text
    [call] = res.json()["choices"][0]["message"]["tool_calls"]
    assert_valid_call(call["function"]["name"], call["function"]["arguments"])


# ---- start-up options ---------------------------------------------------------------------------------------------


def test_chat_template_option_is_checked_at_start_up(tokenizer: Any, tmp_path: Path) -> None:
    def parser(template: str) -> RequestParser:
        return RequestParser(make_config(model_id="m", chat_template=template), tokenizer, 2048)

    assert parser(TOOL_TEMPLATE).chat_template.supports_tools  # inline text
    with pytest.raises(ConfigError, match=r"option.chat_template=.*does not compile \(line 1"):
        parser("{% if %}")
    with pytest.raises(ConfigError, match=r"option.chat_template=.*cannot read it"):
        parser(str(tmp_path / "missing.jinja"))
    assert RequestParser(make_config(model_id="m"), tokenizer, 2048).chat_template.supports_tools is False


def test_unknown_tool_call_parser_stops_start_up() -> None:
    from llm_endpoint.server.config import load_config

    with pytest.raises(ConfigError, match=r"option.tool_call_parser \(env OPTION_TOOL_CALL_PARSER\)='mistral'.*hermes"):
        load_config(None, {"OPTION_MODEL_ID": "m", "OPTION_TOOL_CALL_PARSER": "mistral"})


# ---- the parser on crafted output ----------------------------------------------------------------------------------


def _read(text: str, fmt: str = "hermes", cuts: tuple[int, ...] = (), max_calls: int | None = None) -> list[Piece]:
    parser = ToolCallParser(fmt, max_calls)  # type: ignore[arg-type]
    bounds = [0, *cuts, len(text)]
    pieces = [p for a, b in zip(bounds, bounds[1:]) for p in parser.feed(text[a:b])]
    return pieces + parser.finish()


def _assemble(pieces: list[Piece]) -> tuple[str, list[tuple[str, str]]]:
    content = "".join(p.text for p in pieces if isinstance(p, Content))
    calls: dict[int, list[str]] = {}
    for p in pieces:
        if isinstance(p, CallStart):
            assert p.index == len(calls) and p.id.startswith("call_")
            calls[p.index] = [p.name, ""]
        elif isinstance(p, CallArguments):
            calls[p.index][1] += p.text
    return content, [(name, args) for name, args in calls.values()]


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "celsius",'
          ' "n": [1, {"a": null}]}}\n</tool_call>\n<tool_call>\n{"arguments": "{\\"zone\\": \\"UTC\\"}", '
          '"name": "get_time"}\n</tool_call>')
HERMES_CALLS = [("get_weather", '{"city": "Pa\\"ris}", "unit": "celsius", "n": [1, {"a": null}]}'),
                ("get_time", '{"zone": "UTC"}')]


@pytest.mark.parametrize("cut", range(1, len(HERMES)))
def test_hermes_output_split_anywhere_reads_the_same(cut: int) -> None:
    pieces = _read(HERMES, cuts=(cut,))
    assert _assemble(pieces) == ("Let me check.", HERMES_CALLS)
    assert not any(isinstance(p, Content) and "<" in p.text for p in pieces)


def test_hermes_output_token_by_token_streams_the_arguments() -> None:
    pieces = _read(HERMES, cuts=tuple(range(1, len(HERMES))))
    assert _assemble(pieces) == ("Let me check.", HERMES_CALLS)
    assert sum(isinstance(p, CallArguments) and p.index == 0 for p in pieces) > 20  # as they arrive
    first_start = next(i for i, p in enumerate(pieces) if isinstance(p, CallStart))
    assert all(isinstance(p, Content) for p in pieces[:first_start])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Just text, with a < and a <tool and </tool_call>.", ("Just text, with a < and a <tool and </tool_call>.", [])),
        ("Cut off at <tool_c", ("Cut off at <tool_c", [])),  # never a tag: the model's own text
        ('Cut off <tool_call>{"na', ("Cut off", [])),  # neither a call nor an answer
        ("<tool_call>not json</tool_call>", ("<tool_call>not json</tool_call>", [])),
        ('<tool_call>{"name": "f"}</tool_call>', ("", [("f", "{}")])),
        ('<tool_call>{"name": "f", "arguments": {}}\nand then text', ("and then text", [("f", "{}")])),
        ('<tool_call>{"tool": "f"}</tool_call>', ('<tool_call>{"tool": "f"}</tool_call>', [])),
        ('<tool_call>{"name": "f", "arguments": {"a": 1', ("", [("f", '{"a": 1')])),  # cut off: as far as it got
        ("  plain answer  ", ("  plain answer  ", [])),  # no calls: the text exactly
    ],
)
def test_hermes_edge_cases(text: str, expected: tuple) -> None:
    assert _assemble(_read(text)) == expected
    assert _assemble(_read(text, cuts=tuple(range(1, len(text))))) == expected


def test_calls_beyond_max_calls_are_dropped() -> None:
    assert _assemble(_read(HERMES, max_calls=1)) == ("Let me check.", HERMES_CALLS[:1])


JSON_CALLS = ' [ {"name": "get_time", "arguments": {"zone": "CET"}} ,\n{"name": "f", "arguments": {}}]'


@pytest.mark.parametrize("cut", range(1, len(JSON_CALLS)))
def test_constrained_json_calls_split_anywhere(cut: int) -> None:
    assert _assemble(_read(JSON_CALLS, "json", (cut,))) == ("", [("get_time", '{"zone": "CET"}'), ("f", "{}")])


def _events(texts: list[str], finish: FinishReason = FinishReason.EOS_TOKEN) -> list[TokenEvent]:
    events = [TokenEvent(Token(i, t, -0.1)) for i, t in enumerate(texts)]
    events[-1] = TokenEvent(events[-1].token, finish_reason=finish, prompt_tokens=5)
    return events


def _options(stream: bool) -> OutputOptions:
    return OutputOptions(kind="chat", stream=stream, formatter="sse" if stream else "json", model="m",
                         tool_calls="hermes")


AUTO_OUTPUT = ["Sure", ".\n", "<tool", '_call>\n{"name": "get', '_weather", "argu', 'ments": {"city": ',
               '"Oslo", "unit": "celsius"}}\n</tool_call>']


def test_auto_output_becomes_tool_calls_whole_and_streamed() -> None:
    """Crafted model output through the chat formatters: the body's message and the stream's deltas agree."""
    whole = make_formatter(_options(False), "r")
    for event in _events(AUTO_OUTPUT):
        whole.on_event(event)
    choice = json.loads(whole.body())["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}

    stream = make_formatter(_options(True), "r")
    frames = [f for e in _events(AUTO_OUTPUT) for f in stream.on_event(e)]
    chunks = [json.loads(f[len("data: "):]) for f in frames if f != "data: [DONE]\n\n"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    fragments = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert fragments[0]["id"].startswith("call_") and fragments[0]["function"]["name"] == "get_weather"
    assert "".join(f["function"]["arguments"] for f in fragments) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_plain_answer_with_tools_is_unchanged() -> None:
    whole = make_formatter(_options(False), "r")
    for event in _events(["No", " tools", " needed", ".", "\n"]):
        whole.on_event(event)
    choice = json.loads(whole.body())["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "No tools needed.\n"}
    assert choice["finish_reason"] == "stop"
