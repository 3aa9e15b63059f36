"""Structured output on every backend, through the official openai client and LMI bodies: the output is
constrained while it is generated (never retried), so it parses and validates against the schema whatever
the small demo model would have written on its own.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests
import torch

from llm_endpoint.backends.errors import BackendError
from llm_endpoint.backends.torch_engine.grammar import Constraint, GrammarError, Grammars
from llm_endpoint.backends.types import FinishReason
from llm_endpoint.server.request_parser import json_schema_text
from tests.engine_harness import EngineHarness, Stream

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with their name, age and favourite colour."}]
BUDGET = 120  # tokens: far more than PERSON needs, so a valid answer ends by itself ("stop")


def person_format(schema: dict | None = None) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema or PERSON, "strict": True}}


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(oai, temperature: float) -> None:
    reply = oai.chat.completions.create(model="m", messages=ASK, max_tokens=BUDGET, temperature=temperature, seed=7,
                                        response_format=person_format())
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert list(json.loads(choice.message.content)) == list(PERSON["properties"])  # the schema's order, as OpenAI


def test_json_object_output_is_an_object(oai) -> None:
    """Any object at all: the demo model, asked this, closes a flat one (asked for a person it nests forever)."""
    question = [{"role": "user", "content": "Reply in JSON. What is the capital of France?"}]
    reply = oai.chat.completions.create(model="m", messages=question, max_tokens=BUDGET, temperature=0,
                                        response_format={"type": "json_object"})
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)


def test_streamed_json_assembles_to_the_same_valid_json(oai) -> None:
    whole = oai.chat.completions.create(model="m", messages=ASK, max_tokens=BUDGET, temperature=0,
                                        response_format=person_format())
    stream = oai.chat.completions.create(model="m", messages=ASK, max_tokens=BUDGET, temperature=0,
                                         response_format=person_format(), stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token
    jsonschema.validate(json.loads(text), PERSON)
    assert text == whole.choices[0].message.content


def test_completions_take_response_format(oai) -> None:
    reply = oai.completions.create(model="m", prompt="A person, as JSON:", max_tokens=BUDGET, temperature=0,
                                   extra_body={"response_format": person_format()})
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


@pytest.mark.parametrize("as_text", [False, True])
def test_lmi_guided_json(server, as_text: bool) -> None:
    """LMI bodies name the schema as vLLM's `guided_json` does, as an object or as JSON text."""
    schema = json.dumps(PERSON) if as_text else PERSON
    body = {"inputs": "A person, as JSON:", "parameters": {"max_new_tokens": BUDGET, "guided_json": schema,
                                                            "details": True}}
    res = requests.post(server.url + "/invocations", json=body, timeout=120)
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["details"]["finish_reason"] == "eos_token", out
    jsonschema.validate(json.loads(out["generated_text"]), PERSON)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"response_format": person_format({"type": "strin"})}, "response_format.json_schema.schema"),
        ({"response_format": person_format({"type": "object", "required": "name"})}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_bad_structured_output_requests_are_424_naming_the_field(server, body: dict, field: str) -> None:
    res = requests.post(server.url + "/v1/chat/completions",
                        json={"messages": ASK, "max_tokens": 8, **body}, timeout=60)
    assert res.status_code == 424, res.text
    assert res.json()["code"] == 424 and f"'{field}'" in res.json()["error"], res.text


def test_bad_lmi_guided_json_is_424(server) -> None:
    for schema, expected in (({"type": 5}, "not a valid JSON schema"), ("{not json", "not valid JSON")):
        res = requests.post(server.url + "/invocations",
                            json={"inputs": "x", "parameters": {"guided_json": schema}}, timeout=60)
        assert res.status_code == 424, res.text
        assert "'parameters.guided_json'" in res.json()["error"] and expected in res.json()["error"]


def test_schema_the_engine_cannot_compile_is_424(server) -> None:
    """Valid by the metaschema, but its reference points nowhere: the engine's compiler refuses it."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}
    res = requests.post(server.url + "/v1/chat/completions",
                        json={"messages": ASK, "max_tokens": 8, "response_format": person_format(schema)}, timeout=60)
    assert res.status_code == 424, res.text
    assert res.json()["code"] == 424


def test_constrained_request_leaves_its_neighbour_unchanged(oai) -> None:
    """A constrained row beside an unconstrained one: the unconstrained greedy answer is what it is alone."""
    plain = {"model": "m", "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 40,
             "temperature": 0}
    alone = oai.chat.completions.create(**plain).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:
        constrained = pool.submit(oai.chat.completions.create, model="m", messages=ASK, max_tokens=BUDGET,
                                  temperature=0, response_format=person_format())
        beside = pool.submit(oai.chat.completions.create, **plain)
        jsonschema.validate(json.loads(constrained.result().choices[0].message.content), PERSON)
        assert beside.result().choices[0].message.content == alone


# ---- our engine, without HTTP: a small KV pool and a failing matcher ----------------------------------------------


def _text(stream: Stream) -> str:
    return "".join(e.token.text for e in stream.events)


def test_constrained_rows_in_a_small_pool_and_a_failing_matcher_fails_alone(model_dir: Path, tokenizer: Any) -> None:
    """Nine requests in a pool of one full-length sequence's blocks (they queue for blocks): each constrained
    row ends its document validly, as it does alone. A row whose matcher raises fails alone; its neighbours'
    outputs do not change."""
    max_model_len = 128
    block_bytes = 16 * 2 * 30 * 3 * 64 * 4  # fp32 demo model
    space = (max_model_len // 16 + 1) * block_bytes  # one full-length sequence's blocks for nine requests
    schema = json_schema_text(PERSON, "schema")
    harness = EngineHarness(model_dir, tokenizer, max_model_len=max_model_len, kv_cache_space=space)
    engine = harness.engine
    assert engine is not None
    grammars = Grammars(tokenizer, engine.runner.vocab_size, engine.output.eos_ids)

    class Breaking(Constraint):
        """Its mask fails on the fourth step."""

        def __init__(self, inner: Constraint) -> None:
            self.__dict__.update(inner.__dict__)
            self.calls = 0

        def allowed(self) -> torch.Tensor:
            self.calls += 1
            if self.calls > 3:
                raise GrammarError("broken on purpose")
            return super().allowed()

    def streams() -> list[tuple[Stream, bool]]:
        made = [(Stream(f"Person number {i}, as JSON:", 80, {"json_schema": schema}), True) for i in range(6)]
        return made + [(Stream(f"A short story ({i}):", 60, {"ignore_eos": True}), False) for i in range(2)]

    try:
        batch = streams()
        poison = Stream("Broken, as JSON:", 40, {"json_schema": schema})
        harness.submit(poison, constraint=Breaking(grammars.constraint(schema)))
        for stream, constrained in batch:
            harness.submit(stream, constraint=grammars.constraint(schema) if constrained else None)
        for stream, _ in [*batch, (poison, True)]:
            assert stream.done.wait(300)
        solo = []
        for stream, constrained in streams():
            harness.submit(stream, constraint=grammars.constraint(schema) if constrained else None)
            assert stream.done.wait(300)
            solo.append(stream.token_ids)
    finally:
        harness.stop()
    assert isinstance(poison.error, BackendError) and "broken on purpose" in str(poison.error)
    for stream, constrained in batch:
        assert stream.error is None
        if constrained:
            assert stream.events[-1].finish_reason is FinishReason.EOS_TOKEN
            jsonschema.validate(json.loads(_text(stream)), PERSON)
    assert [s.token_ids for s, _ in batch] == solo
