"""Real client libraries against a real server: huggingface_hub's InferenceClient (TGI compatibility, as
LMI's `tgi_client.py` runs it) and the official openai client.
"""

from __future__ import annotations

import json
import math

import openai
import pytest
import requests
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.inference._generated.types import (
    TextGenerationOutputDetails,
    TextGenerationStreamOutputStreamDetails,
)

from tests.conftest import NO_TOP_TOKENS

PROMPT = "What is Deep Learning?"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


@pytest.fixture
def tgi_server(servers, backend):
    return servers.get(backend, tgi_compat="true")


@pytest.fixture
def tgi_client(tgi_server) -> InferenceClient:
    return InferenceClient(model=tgi_server.url + "/invocations", timeout=120)


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)


def greedy_reference(hf_model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy ids and their log-probs from transformers itself."""
    ids = torch.tensor([prompt_ids])
    out_ids, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(ids).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            nxt = int(torch.argmax(lp))
            out_ids.append(nxt)
            logprobs.append(float(lp[nxt]))
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out_ids, logprobs


# ---- huggingface_hub InferenceClient with tgi_compat ---------------------------------------------------------


def test_tgi_text_generation_with_details(tgi_client, tokenizer, hf_model) -> None:
    out = tgi_client.text_generation(PROMPT, max_new_tokens=20, details=True)
    assert isinstance(out.generated_text, str) and out.generated_text
    details = out.details
    assert isinstance(details, TextGenerationOutputDetails)
    assert details.finish_reason in ("length", "eos_token")
    assert details.generated_tokens == len(details.tokens) <= 20
    assert "".join(t.text for t in details.tokens) == out.generated_text
    for token in details.tokens:
        assert isinstance(token.id, int)
        assert isinstance(token.logprob, float) and token.logprob <= 0
    # greedy by default: the first tokens and their log-probs match transformers
    ref_ids, ref_lps = greedy_reference(hf_model, tokenizer(PROMPT)["input_ids"], 8)
    assert [t.id for t in details.tokens[:8]] == ref_ids
    assert [t.logprob for t in details.tokens[:8]] == pytest.approx(ref_lps, abs=0.05)


def test_tgi_text_generation_stream_with_details(tgi_client) -> None:
    chunks = list(tgi_client.text_generation(PROMPT, max_new_tokens=20, details=True, stream=True))
    assert 1 <= len(chunks) <= 20
    for chunk in chunks:
        assert isinstance(chunk.token.id, int)
        assert isinstance(chunk.token.logprob, float) and chunk.token.logprob <= 0
    for chunk in chunks[:-1]:
        assert chunk.generated_text is None and chunk.details is None
    last = chunks[-1]
    assert isinstance(last.generated_text, str)
    assert last.generated_text == "".join(c.token.text for c in chunks)
    assert isinstance(last.details, TextGenerationStreamOutputStreamDetails)
    assert last.details.generated_tokens == len(chunks)
    assert last.details.finish_reason in ("length", "eos_token")
    # streaming and non-streaming greedy runs produce the same text
    assert last.generated_text == tgi_client.text_generation(PROMPT, max_new_tokens=20)


def test_tgi_text_generation_plain(tgi_client) -> None:
    text = tgi_client.text_generation(PROMPT, max_new_tokens=6)
    assert isinstance(text, str) and text
    stream = list(tgi_client.text_generation(PROMPT, max_new_tokens=6, stream=True))
    assert all(isinstance(s, str) for s in stream)
    assert "".join(stream) == text


# ---- openai ---------------------------------------------------------------------------------------------------


def chat_prompt_tokens(tokenizer) -> int:
    return len(tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_openai_chat(oai, tokenizer) -> None:
    res = oai.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=20)
    assert res.object == "chat.completion"
    choice = res.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert res.usage.prompt_tokens == chat_prompt_tokens(tokenizer)
    # the answer plus the end-of-turn token
    assert res.usage.completion_tokens == len(tokenizer(ANSWER)["input_ids"]) + 1
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_openai_chat_max_tokens_finishes_with_length(oai) -> None:
    res = oai.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=3)
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 3
    assert ANSWER.startswith(res.choices[0].message.content)


def test_openai_streaming_chat(oai) -> None:
    chunks = list(oai.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=20, stream=True))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == ANSWER
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == "stop"
    assert all(r is None for r in reasons[:-1])
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage


def test_openai_logprobs(oai, tokenizer, hf_model, backend) -> None:
    if backend in NO_TOP_TOKENS:
        with pytest.raises(openai.APIStatusError) as err:
            oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=5, logprobs=True, top_logprobs=2)
        assert err.value.status_code == 424 and "top_logprobs" in str(err.value.body)
        return
    res = oai.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, max_tokens=20, logprobs=True, top_logprobs=2
    )
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens  # one entry per generated token
    assert "".join(entry.token for entry in content) == res.choices[0].message.content == ANSWER
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob <= 0 and all(t.logprob <= 0 for t in entry.top_logprobs)
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode())
    # values are the model's: compare the first position with transformers
    prompt_ids = tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(hf_model(torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)
    top = torch.topk(lp, 2)
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=0.02)
    assert [t.token for t in first.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
    assert all(math.isfinite(e.logprob) for e in content)


def test_openai_streaming_logprobs_match_non_streaming(oai, backend) -> None:
    top = 0 if backend in NO_TOP_TOKENS else 2
    kwargs = dict(model="m", messages=QUESTION, temperature=0, max_tokens=20, logprobs=True, top_logprobs=top)
    full = oai.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in oai.chat.completions.create(stream=True, **kwargs)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in full]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in full], abs=1e-5)
    assert all(len(e.top_logprobs) == top for e in streamed)


def test_openai_stream_options_include_usage(oai, tokenizer) -> None:
    chunks = list(oai.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    ))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == ANSWER
    assert last.usage.prompt_tokens == chat_prompt_tokens(tokenizer)
    assert last.usage.completion_tokens == len(tokenizer(ANSWER)["input_ids"]) + 1
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_openai_client_sees_errors_as_api_status_errors(oai) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(model="m", messages=QUESTION, n=17)
    assert info.value.status_code == 424
    # LMI's {"error": str, "code": 424}: the openai client keeps the string as the error body
    assert "'n'" in str(info.value.body) and "between 1 and 16" in str(info.value.body)


def test_chat_through_invocations_with_messages_body(server) -> None:
    res = requests.post(
        server.url + "/invocations",
        json={"messages": QUESTION, "temperature": 0, "max_tokens": 20},
        timeout=60,
    )
    assert res.status_code == 200
    assert res.headers["content-type"] == "application/json"
    body = res.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_through_invocations_is_sse_with_done(server) -> None:
    res = requests.post(
        server.url + "/invocations",
        json={"messages": QUESTION, "temperature": 0, "max_tokens": 20, "stream": True},
        timeout=60,
    )
    assert res.status_code == 200
    assert res.headers["content-type"] == "text/event-stream"
    events = [e for e in res.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ANSWER


# ---- openai: models and (legacy) completions --------------------------------------------------------------------


def lmi_greedy(server, prompt: str, max_new_tokens: int) -> dict:
    """The same greedy generation through LMI's own schema, with details: the reference for completions."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True}}
    return requests.post(server.url + "/invocations", json=body, timeout=120).json()


def test_openai_models_list(oai, server) -> None:
    model_name = requests.get(server.url + "/ping", timeout=10).json().popitem()[0]
    models = list(oai.models.list())
    assert [m.id for m in models] == [model_name]
    assert models[0].object == "model"
    assert oai.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_openai_completion_matches_lmi_greedy(oai, server, tokenizer) -> None:
    res = oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, seed=7, user="someone")
    reference = lmi_greedy(server, PROMPT, 12)
    assert res.object == "text_completion"
    assert res.choices[0].text == reference["generated_text"]
    assert res.choices[0].finish_reason == ("length" if reference["details"]["finish_reason"] == "length" else "stop")
    assert res.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert res.usage.completion_tokens == reference["details"]["generated_tokens"]
    # a one-element list is the same prompt
    listed = oai.completions.create(model="m", prompt=[PROMPT], max_tokens=12, temperature=0)
    assert listed.choices[0].text == res.choices[0].text


def test_openai_completion_stream(oai, server) -> None:
    chunks = list(oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 6  # token by token
    assert "".join(c.choices[0].text for c in with_choices) == lmi_greedy(server, PROMPT, 12)["generated_text"]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_openai_completion_echo_and_stop(oai, server) -> None:
    reference = lmi_greedy(server, PROMPT, 12)["generated_text"]
    echoed = oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + reference
    streamed = oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + reference
    stop = reference.split()[2]  # a word the greedy answer reaches
    stopped = oai.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == reference[: reference.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_openai_completion_logprobs(oai, server, backend) -> None:
    if backend in NO_TOP_TOKENS:
        with pytest.raises(openai.APIStatusError) as err:
            oai.completions.create(model="m", prompt=PROMPT, max_tokens=4, logprobs=2)
        assert err.value.status_code == 424 and "logprobs" in str(err.value.body)
        return
    res = oai.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    reference = lmi_greedy(server, PROMPT, 8)["details"]["tokens"]
    assert lp.tokens == [t["text"] for t in reference]
    assert lp.token_logprobs == pytest.approx([t["log_prob"] for t in reference], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for chosen, chosen_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(chosen_lp, abs=1e-6)  # greedy: the chosen token is the likeliest
        assert top.get(chosen) == pytest.approx(chosen_lp, abs=1e-6) or chosen not in top
    streamed = [c.choices[0].logprobs for c in oai.completions.create(
        model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, stream=True)]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"suffix": "!"}, "suffix"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prompt": [PROMPT, PROMPT]}, "prompt"),
    ],
)
def test_openai_completion_unsupported_fields_are_424_naming_them(oai, kwargs: dict, field: str) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        oai.completions.create(**{"model": "m", "prompt": PROMPT, "max_tokens": 4, **kwargs})
    assert err.value.status_code == 424 and field in str(err.value.body)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),  # a schema is needed
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_openai_chat_unimplemented_fields_are_424_naming_them(oai, kwargs: dict, field: str) -> None:
    """Never a plain-text 200 that silently ignored what was asked."""
    with pytest.raises(openai.APIStatusError) as err:
        oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, **kwargs)
    assert err.value.status_code == 424 and field in str(err.value.body)
    # their neutral values are fine
    ok = oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, response_format={"type": "text"},
                                     tool_choice="none", user="u")
    assert ok.choices[0].message.content


# ---- TGI's own routes at the server root ------------------------------------------------------------------------


@pytest.fixture
def tgi_root_client(tgi_server) -> InferenceClient:
    return InferenceClient(base_url=tgi_server.url, timeout=120)


def test_tgi_root_text_generation(tgi_root_client, tgi_client) -> None:
    """InferenceClient(base_url=root) posts to `/`; it answers what /invocations answers."""
    text = tgi_root_client.text_generation(PROMPT, max_new_tokens=10)
    assert text == tgi_client.text_generation(PROMPT, max_new_tokens=10)
    stream = list(tgi_root_client.text_generation(PROMPT, max_new_tokens=10, stream=True))
    assert len(stream) == 10 and "".join(stream) == text
    out = tgi_root_client.text_generation(PROMPT, max_new_tokens=10, details=True, stop=[text.split()[1]])
    assert out.details.finish_reason == "stop_sequence"
    assert out.generated_text == text[: text.index(text.split()[1])]


def test_tgi_generate_and_generate_stream(tgi_server, tgi_root_client) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}
    res = requests.post(tgi_server.url + "/generate", json={**body, "stream": True}, timeout=120)
    assert res.status_code == 200 and res.headers["content-type"] == "application/json"
    generated = res.json()
    assert set(generated) == {"generated_text"}  # TGI: an object, details only when asked
    assert generated["generated_text"] == tgi_root_client.text_generation(PROMPT, max_new_tokens=6)
    detailed = requests.post(tgi_server.url + "/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "details": True}}, timeout=120).json()
    assert detailed["details"]["generated_tokens"] == len(detailed["details"]["tokens"]) == 6
    res = requests.post(tgi_server.url + "/generate_stream", json=body, timeout=120)
    assert res.headers["content-type"] == "text/event-stream"
    events = [json.loads(e[len("data:"):]) for e in res.text.split("\n\n") if e]
    assert len(events) == 6
    assert events[-1]["generated_text"] == generated["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert all("logprob" in e["token"] for e in events)


def test_tgi_routes_are_absent_without_tgi_compat(server) -> None:
    assert requests.post(server.url + "/generate", json={"inputs": PROMPT}, timeout=30).status_code == 404


# ---- frequency and presence penalties -------------------------------------------------------------------------

REPETITIVE = "one one one one one one one one one one"


def penalized_greedy_reference(hf_model, prompt_ids: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    """Greedy ids from transformers with OpenAI's penalties applied by hand: logit[j] -= frequency * count[j]
    + presence * (count[j] > 0), counting the output's tokens only."""
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(ids).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            nxt = int(torch.argmax(logits - frequency * counts - presence * (counts > 0).float()))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_openai_frequency_and_presence_penalties(oai, backend, tokenizer, hf_model) -> None:
    kwargs = dict(model="m", prompt=REPETITIVE, max_tokens=12, temperature=0)
    plain = oai.completions.create(**kwargs).choices[0].text
    penalized = oai.completions.create(frequency_penalty=1.5, presence_penalty=0.5, **kwargs).choices[0].text
    assert penalized != plain  # greedy continues the repetition unless the penalties change its choices
    if backend != "openvino":  # OpenVINO GenAI applies its own (native) variant of the two penalties
        ref = penalized_greedy_reference(hf_model, tokenizer(REPETITIVE)["input_ids"], 12, 1.5, 0.5)
        assert penalized == tokenizer.decode(ref)
    # negative values encourage repetition: at least as many repeats of the most common output token
    encouraged = oai.completions.create(frequency_penalty=-1.0, **kwargs).choices[0].text
    assert encouraged.split().count("one") >= penalized.split().count("one")
    chat = oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=8, temperature=0,
                                       frequency_penalty=1.0, presence_penalty=1.0)
    assert chat.choices[0].message.content
