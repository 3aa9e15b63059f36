"""OpenAI `n`, `best_of` and `echo` with `logprobs`, with the official openai client against a real server on
every backend: each is served by every engine (the server fans a request out into one generation per
candidate), so nothing here is skipped per backend.
"""

from __future__ import annotations

import time

import openai
import pytest
import requests
import torch

from tests.test_disconnect import metric, wait_until

PROMPT = "Once upon a time, in a small village by the sea, there lived a"
QUESTION = [{"role": "user", "content": "Tell me something about cats."}]
SAMPLED = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=180, max_retries=0)


def mean_logprob(values: list[float]) -> float:
    return sum(values) / len(values)


def test_chat_n_sampled_with_seed_is_n_distinct_reproducible_choices(oai) -> None:
    ask = dict(model="m", messages=QUESTION, max_tokens=12, n=2, logprobs=True, **SAMPLED)
    first = oai.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1]
    contents = [c.message.content for c in first.choices]
    assert all(contents), contents
    assert contents[0] != contents[1], "both choices drew the same samples: their seeds are not distinct"
    # usage counts every choice's tokens (one logprobs entry per token)
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
    again = oai.chat.completions.create(**ask)
    assert [c.message.content for c in again.choices] == contents
    # choice 0 is what n=1 with the same seed gives
    single = oai.chat.completions.create(**{**ask, "n": 1})
    assert single.choices[0].message.content == contents[0]


def test_chat_n_greedy_gives_identical_choices(oai) -> None:
    res = oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=8, n=3, temperature=0)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert len({c.message.content for c in res.choices}) == 1


def test_chat_n_stream_assembles_every_choice(oai) -> None:
    ask = dict(model="m", messages=QUESTION, max_tokens=12, n=2, **SAMPLED)
    whole = oai.chat.completions.create(**ask)
    texts: dict[int, str] = {}
    roles: dict[int, int] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in oai.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert not finishes.get(choice.index), "a chunk after its choice finished"
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles[choice.index] = roles.get(choice.index, 0) + (choice.delta.role == "assistant")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert roles == {0: 1, 1: 1} and set(finishes) == {0, 1}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_n_and_stream(oai) -> None:
    ask = dict(model="m", prompt=PROMPT, max_tokens=10, n=2, **SAMPLED)
    res = oai.completions.create(**ask)
    assert [c.index for c in res.choices] == [0, 1] and all(c.text for c in res.choices)
    streamed: dict[int, str] = {}
    for chunk in oai.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in res.choices}


def test_best_of_returns_the_n_candidates_with_the_highest_logprob_per_token(oai) -> None:
    """best_of=3 generates the candidates n=3 would (same seed), and returns the two best of them."""
    ask = dict(model="m", prompt=PROMPT, max_tokens=10, logprobs=0, **SAMPLED)
    all_three = oai.completions.create(**ask, n=3).choices
    ranked = sorted(all_three, key=lambda c: mean_logprob(c.logprobs.token_logprobs), reverse=True)
    best = oai.completions.create(**ask, n=2, best_of=3)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    # usage bills every candidate, the one not returned too
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in all_three)
    # without logprobs asked, the ranking is the same and the response carries none
    plain = oai.completions.create(**{**ask, "logprobs": None}, n=2, best_of=3)
    assert [c.text for c in plain.choices] == [c.text for c in ranked[:2]]
    assert all(c.logprobs is None for c in plain.choices)


def prompt_logprobs_reference(hf_model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def test_completion_echo_with_logprobs_scores_the_prompt(oai, tokenizer, hf_model) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    res = oai.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=0)
    choice = res.choices[0]
    lp = choice.logprobs
    plain = oai.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0).choices[0]
    assert choice.text == PROMPT + plain.text
    assert "".join(lp.tokens[: len(ids)]) == PROMPT
    assert lp.tokens[len(ids):] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(prompt_logprobs_reference(hf_model, ids), abs=0.02)
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = [c.choices[0] for c in oai.completions.create(
        model="m", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=0, stream=True)]
    assert "".join(c.text for c in streamed) == choice.text
    assert [t for c in streamed for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in streamed for o in c.logprobs.text_offset] == lp.text_offset


@pytest.mark.parametrize(
    ("kwargs", "wanted"),
    [
        ({"n": 17}, ("'n'", "between 1 and 16", "got 17")),
        ({"best_of": 17}, ("'best_of'", "between 1 and 16")),
        ({"n": 3, "best_of": 2}, ("'best_of'=2", "at least 'n'=3")),
        ({"best_of": 2, "stream": True}, ("'best_of'=2", "streaming")),
    ],
)
def test_completion_choice_limits_are_424(oai, kwargs: dict, wanted: tuple[str, ...]) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        result = oai.completions.create(model="m", prompt=PROMPT, max_tokens=4, **kwargs)
        if kwargs.get("stream"):
            list(result)
    assert err.value.status_code == 424
    for part in wanted:
        assert part in str(err.value.body)


def test_chat_n_over_limit_and_lmi_n_are_424(oai, server) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, n=17)
    assert err.value.status_code == 424 and "between 1 and 16" in str(err.value.body)
    res = requests.post(server.url + "/invocations", json={"inputs": PROMPT, "parameters": {"n": 2}}, timeout=60)
    assert res.status_code == 424 and "parameters.n" in res.json()["error"]


def test_disconnect_mid_stream_ends_every_choice(server, oai) -> None:
    url = server.url
    assert wait_until(lambda: metric(url, "llm_running_batch_size") == 0, 30) is not None
    stream = oai.completions.create(model="m", prompt=PROMPT, max_tokens=1000, n=3, stream=True,
                                    extra_body={"ignore_eos": True}, **SAMPLED)
    seen: set[int] = set()
    for chunk in stream:
        seen.update(c.index for c in chunk.choices)
        if seen == {0, 1, 2}:
            break
    assert wait_until(lambda: metric(url, "llm_running_batch_size") == 3, 30) is not None
    stream.close()
    took = wait_until(lambda: metric(url, "llm_running_batch_size") == 0, 5)
    assert took is not None, "a choice kept generating after the client left"
    time.sleep(0.3)
    assert metric(url, "llm_running_batch_size") == 0 and metric(url, "llm_queue_depth") == 0
