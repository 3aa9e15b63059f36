"""Our engine against transformers itself: greedy tokens and log-probs, through the real HTTP server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a short poem about the sea, the wind, and a lighthouse keeper who waits for a ship.",
    "Explain, step by step and with an example, how a hash table handles collisions when two different "
    "keys land in the same bucket, and why the load factor matters for performance in practice.",
    "List three colours:",
    "In 1969, the first humans landed on the Moon. The mission was called",
]
MAX_NEW = 24


def _generate(url: str, prompt: str, **params) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True, **params}}
    response = requests.post(url + "/invocations", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def _reference_greedy(hf_model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("rolling_batch", ["scheduler", "disable"])
def test_concurrent_greedy_equals_transformers_generate(servers, hf_model, tokenizer, rolling_batch) -> None:
    server = servers.get(rolling_batch)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: _generate(server.url, p), PROMPTS))
    for prompt, result in zip(PROMPTS, results):
        expected = _reference_greedy(hf_model, tokenizer, prompt)
        got = [t["id"] for t in result["details"]["tokens"]]
        assert got == expected, f"prompt {prompt!r}"
        assert result["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert result["details"]["generated_tokens"] == len(expected)


def _sequence_log_likelihood(hf_model, tokenizer, prompt: str, generated: list[int]) -> float:
    """log P(generated | prompt) from one teacher-forced forward pass, independently of the server."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + generated])
    with torch.inference_mode():
        logits = hf_model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(generated).view(-1, 1)).sum())


@pytest.mark.parametrize("params", [{}, {"do_sample": True, "temperature": 0.7, "top_k": 40, "seed": 7}])
def test_log_probs_sum_to_sequence_log_likelihood(servers, hf_model, tokenizer, params) -> None:
    server = servers.get("scheduler")
    prompt = PROMPTS[2]
    result = _generate(server.url, prompt, **params)
    tokens = result["details"]["tokens"]
    total = sum(t["log_prob"] for t in tokens)
    expected = _sequence_log_likelihood(hf_model, tokenizer, prompt, [t["id"] for t in tokens])
    assert abs(total - expected) < 1e-3, (total, expected)


def test_same_seed_same_sample_and_different_seed_differs(servers) -> None:
    server = servers.get("scheduler")
    params = {"do_sample": True, "temperature": 1.0, "seed": 1234}
    a = _generate(server.url, PROMPTS[1], **params)
    b = _generate(server.url, PROMPTS[1], **params)
    assert [t["id"] for t in a["details"]["tokens"]] == [t["id"] for t in b["details"]["tokens"]]
    others = {tuple(t["id"] for t in _generate(server.url, PROMPTS[1], **{**params, "seed": s})["details"]["tokens"])
              for s in range(4)}
    assert len(others) > 1, "different seeds should not all give the same sample"


def test_prefill_log_probs_match_teacher_forcing(servers, hf_model, tokenizer) -> None:
    server = servers.get("scheduler")
    prompt = PROMPTS[3]
    result = _generate(server.url, prompt, decoder_input_details=True)
    prefill = result["details"]["prefill"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert [t["id"] for t in prefill] == prompt_ids
    assert prefill[0]["log_prob"] is None
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt_ids])).logits[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompt_ids[1:]).view(-1, 1)).view(-1)
    got = torch.tensor([t["log_prob"] for t in prefill[1:]])
    assert torch.allclose(got, expected, atol=1e-3)


def test_top_n_tokens_are_the_models_most_likely(servers, hf_model, tokenizer) -> None:
    server = servers.get("scheduler")
    result = _generate(server.url, PROMPTS[1], top_n_tokens=3)
    tops = result["details"]["top_tokens"]
    assert len(tops) == len(result["details"]["tokens"])
    first = tops[0]
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf_model(ids).logits[0, -1], -1)
    values, indices = torch.topk(logprobs, 3)
    assert [t["id"] for t in first] == indices.tolist()
    assert all(abs(t["log_prob"] - v) < 1e-3 for t, v in zip(first, values.tolist()))
