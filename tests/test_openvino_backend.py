"""OpenVinoBackend against the real engine and the demo model's GGUF (f32 inference, so runs are repeatable).

References: OpenVINO GenAI called directly (LLMPipeline.generate; ContinuousBatchingPipeline's own
add_request/step/read for log-probs) with the same file and precision. The HF-directory path (export to IR with
optimum-intel) is checked against transformers when an optimum-cli is available (LLM_ENDPOINT_OPTIMUM_CLI).
Runtime on the 2-core machine: about 1 minute, plus ~2 minutes for the first HF->IR export.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

pytest.importorskip("openvino_genai")

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import openvino_genai as ov_genai  # noqa: E402

from llm_endpoint.backends.config import ConfigError  # noqa: E402
from llm_endpoint.backends.errors import BackendError, RequestRejected  # noqa: E402
from llm_endpoint.backends.model_files import load_tokenizer, locate_model  # noqa: E402
from llm_endpoint.backends.openvino.adapter import OpenVinoBackend  # noqa: E402
from llm_endpoint.backends.openvino.ir_export import ir_cache_dir  # noqa: E402
from llm_endpoint.backends.openvino.pipeline import model_path, scheduler_config  # noqa: E402
from llm_endpoint.backends.types import FinishReason, GenerationRequest, SamplingParams  # noqa: E402
from tests.conftest import make_config  # noqa: E402

pytestmark = pytest.mark.openvino
# One event loop for the module, like the server's; the engine thread delivers to the requests' loops.
module_loop = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 1024
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [CHAT, "The three primary colors are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def gguf_path(model_dir: Path) -> Path:
    configured = os.environ.get("LLM_ENDPOINT_TEST_GGUF")
    if configured:
        return Path(configured)
    from llm_endpoint.server.demo_model import demo_gguf_path, prepare_demo_model

    cache_dir = make_config(model_id="unused").cache_dir
    prepare_demo_model(cache_dir)
    return demo_gguf_path(cache_dir)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path: Path):
    return load_tokenizer(locate_model(str(gguf_path)))


@pytest.fixture(scope="module")
def engine(gguf_path: Path, gguf_tokenizer):
    config = make_config(model_id=str(gguf_path), rolling_batch="openvino", dtype="fp32",
                           engine_options={"cache_size": "1"})
    backend = OpenVinoBackend(config, locate_model(str(gguf_path)), gguf_tokenizer, MAX_MODEL_LEN)
    backend.load()
    yield backend
    backend.shutdown()


def direct_run(pipe, prompt_ids: list[int], config) -> tuple[list[int], list[float]]:
    """The engine's own streaming API, no backend of ours: token ids and log-probs."""
    handle = pipe.add_request(0, ov.Tensor(np.asarray([prompt_ids], dtype=np.int64)), config)
    ids: list[int] = []
    log_probs: list[float] = []
    while pipe.has_non_finished_requests():
        pipe.step()
        while handle.can_read():
            for output in handle.read().values():
                ids += output.generated_ids
                log_probs += output.generated_log_probs
    return ids, log_probs


async def collect(backend, tokenizer, prompt: str, request_id: str, **params) -> list:
    request = GenerationRequest(request_id, tuple(tokenizer.encode(prompt)), SamplingParams(**params))
    return [event async for event in backend.generate(request)]


def text_of(events) -> str:
    return "".join(e.token.text for e in events)


@module_loop
async def test_greedy_matches_openvino_direct(engine, gguf_path, gguf_tokenizer):
    llm = ov_genai.LLMPipeline(str(gguf_path), "CPU", **F32)
    cb = ov_genai.ContinuousBatchingPipeline(str(gguf_path), ov_genai.SchedulerConfig(), "CPU", F32)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = 24
    config.logprobs = 1
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = gguf_tokenizer.encode(prompt)
        expected = list(llm.generate(ov.Tensor(np.asarray([prompt_ids], dtype=np.int64)), config).tokens[0])
        direct_ids, direct_log_probs = direct_run(cb, prompt_ids, config)
        events = await collect(engine, gguf_tokenizer, prompt, f"greedy-{i}", max_new_tokens=24)
        ids = [e.token.id for e in events]
        assert ids == expected == direct_ids
        assert [e.token.log_prob for e in events] == pytest.approx(direct_log_probs, abs=1e-5)
        assert text_of(events) == gguf_tokenizer.decode(ids, skip_special_tokens=True)
        assert events[-1].prompt_tokens == len(prompt_ids)


@module_loop
async def test_log_probs_ignore_temperature(engine, gguf_tokenizer):
    """GenAI reports the raw distribution's log-prob: top_k=1 sampling picks the argmax with the same values."""
    greedy = await collect(engine, gguf_tokenizer, PROMPTS[1], "raw-greedy", max_new_tokens=12)
    cold = await collect(engine, gguf_tokenizer, PROMPTS[1], "raw-cold", max_new_tokens=12, do_sample=True,
                         temperature=0.3, top_k=1, seed=1)
    assert [e.token.id for e in cold] == [e.token.id for e in greedy]
    assert [e.token.log_prob for e in cold] == pytest.approx([e.token.log_prob for e in greedy], abs=1e-5)


@module_loop
async def test_prompt_log_probs(engine, gguf_tokenizer):
    prompt_ids = gguf_tokenizer.encode(PROMPTS[1])
    events = await collect(engine, gguf_tokenizer, PROMPTS[1], "prefill", max_new_tokens=4, prompt_logprobs=True)
    prefill = events[0].prefill
    assert [t.id for t in prefill] == prompt_ids
    assert prefill[0].log_prob is None and all(t.log_prob < 0 for t in prefill[1:])
    assert all(e.prefill is None for e in events[1:]) and len(events) == 4


@module_loop
async def test_sampling_seed(engine, gguf_tokenizer):
    runs = [
        [e.token.id for e in await collect(engine, gguf_tokenizer, CHAT, f"seed-{i}", max_new_tokens=16,
                                           do_sample=True, temperature=1.5, seed=seed, ignore_eos=True)]
        for i, seed in enumerate((7, 7, None, None))
    ]
    assert runs[0] == runs[1]
    assert runs[2] != runs[3]  # GenAI's default seed is a constant: unseeded requests must not repeat


@module_loop
async def test_eos_token(engine, gguf_tokenizer):
    events = await collect(engine, gguf_tokenizer, CHAT, "eos", max_new_tokens=60)
    assert events[-1].finish_reason is FinishReason.EOS_TOKEN
    assert events[-1].token.id == gguf_tokenizer.eos_token_id and events[-1].token.special
    assert events[-1].token.text == ""
    assert text_of(events).startswith("The capital of France is Paris")


@module_loop
async def test_stop_sequence(engine, gguf_tokenizer):
    # " Paris" is one token; "of France" spans two.
    for stop, expected in ((" Paris", "The capital of France is"), ("of France", "The capital ")):
        events = await collect(engine, gguf_tokenizer, CHAT, f"stop-{stop}", max_new_tokens=30, stop_sequences=(stop,))
        assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE
        assert text_of(events) == expected
    assert engine.stats().running == 0


@module_loop
async def test_max_new_tokens(engine, gguf_tokenizer):
    events = await collect(engine, gguf_tokenizer, CHAT, "length", max_new_tokens=5)
    assert len(events) == 5 and events[-1].finish_reason is FinishReason.LENGTH


@module_loop
async def test_cancel_aborts_in_engine(engine, gguf_tokenizer):
    request = GenerationRequest("cancel", tuple(gguf_tokenizer.encode(CHAT)),
                                SamplingParams(max_new_tokens=800, ignore_eos=True))
    stream = engine.generate(request)
    for _ in range(3):
        await stream.__anext__()
    assert engine.stats().running == 1
    await stream.aclose()
    for _ in range(100):  # the engine process applies the abort between steps
        if engine.stats().running == 0 and not engine.engine_has_requests:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0 and engine.stats().waiting == 0
    assert not engine.engine_has_requests
    assert len(await collect(engine, gguf_tokenizer, CHAT, "after-cancel", max_new_tokens=3)) == 3


@module_loop
async def test_engine_process_death_fails_requests(gguf_path, gguf_tokenizer):
    """A crashed engine process ends every open stream with an error, and later requests are refused."""
    config = make_config(model_id=str(gguf_path), rolling_batch="openvino", engine_options={"cache_size": "1"})
    backend = OpenVinoBackend(config, locate_model(str(gguf_path)), gguf_tokenizer, MAX_MODEL_LEN)
    backend.load()
    try:
        request = GenerationRequest("doomed", tuple(gguf_tokenizer.encode(CHAT)),
                                    SamplingParams(max_new_tokens=800, ignore_eos=True))
        stream = backend.generate(request)
        await stream.__anext__()
        backend._process.kill()
        with pytest.raises(BackendError, match="the engine stopped"):
            async for _ in stream:
                pass
        with pytest.raises(BackendError, match="not running"):
            await collect(backend, gguf_tokenizer, CHAT, "after-death", max_new_tokens=3)
    finally:
        backend.shutdown()


@module_loop
async def test_concurrent_requests_of_different_lengths(engine, gguf_tokenizer):
    lengths = [3, 40, 9, 25, 1, 17]
    results = await asyncio.gather(*(
        collect(engine, gguf_tokenizer, PROMPTS[i % 3], f"conc-{i}", max_new_tokens=n, ignore_eos=True)
        for i, n in enumerate(lengths)
    ))
    assert [len(r) for r in results] == lengths
    assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
    assert engine.stats().running == 0


@module_loop
async def test_prompt_length_limits(engine, gguf_tokenizer):
    normal = asyncio.ensure_future(
        collect(engine, gguf_tokenizer, CHAT, "beside-long", max_new_tokens=8, ignore_eos=True)
    )
    with pytest.raises(RequestRejected, match="max_model_len"):
        await collect(engine, gguf_tokenizer, "word " * MAX_MODEL_LEN, "too-long", max_new_tokens=4)
    assert len(await normal) == 8
    near = "word " * (MAX_MODEL_LEN - 10)
    events = await collect(engine, gguf_tokenizer, near, "near-limit", max_new_tokens=100, ignore_eos=True)
    assert len(gguf_tokenizer.encode(near)) + len(events) == MAX_MODEL_LEN  # like vLLM: stops at the context
    assert events[-1].finish_reason is FinishReason.LENGTH


def test_scheduler_options(caplog):
    config = make_config(model_id="m", max_rolling_batch_size=8, engine_options={
        "cache_size": "2", "enable_prefix_caching": "true", "max_num_batched_tokens": "512", "tensor_parallel": "x",
    })
    with caplog.at_level(logging.WARNING):
        scheduler = scheduler_config(config)
    assert (scheduler.cache_size, scheduler.enable_prefix_caching, scheduler.max_num_batched_tokens,
            scheduler.max_num_seqs) == (2, True, 512, 8)
    assert "option.tensor_parallel" in caplog.text
    with pytest.raises(ConfigError, match="option.cache_size"):
        scheduler_config(make_config(model_id="m", engine_options={"cache_size": "lots"}))


@module_loop
async def test_hf_directory_is_exported_once(model_dir: Path, tokenizer, hf_model):
    """HF dir -> IR via optimum-intel (own environment), cached; log-probs then match transformers in f32."""
    if make_config(model_id="unused").optimum_cli is None:
        pytest.skip("no optimum-cli (set LLM_ENDPOINT_OPTIMUM_CLI to one in an optimum-intel environment)")
    import torch

    config = make_config(model_id=str(model_dir), rolling_batch="openvino", dtype="fp32")
    backend = OpenVinoBackend(config, locate_model(str(model_dir)), tokenizer, MAX_MODEL_LEN)
    backend.load()
    try:
        ir = ir_cache_dir(model_dir, "fp32", config.cache_dir)
        stamp = (ir / "openvino_model.xml").stat().st_mtime_ns
        prompt_ids = tokenizer.encode(PROMPTS[1])
        events = await collect(backend, tokenizer, PROMPTS[1], "ir", max_new_tokens=12, prompt_logprobs=True)
    finally:
        backend.shutdown()
    ids = prompt_ids + [e.token.id for e in events]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0]
    assert [int(i) for i in logits[len(prompt_ids) - 1 : -1].argmax(-1)] == ids[len(prompt_ids) :]
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert [e.token.log_prob for e in events] == pytest.approx(expected[len(prompt_ids) - 1 :], abs=2e-3)
    assert [t.log_prob for t in events[0].prefill[1:]] == pytest.approx(expected[: len(prompt_ids) - 1], abs=2e-3)
    assert model_path(config, locate_model(str(model_dir))) == ir
    assert (ir / "openvino_model.xml").stat().st_mtime_ns == stamp
