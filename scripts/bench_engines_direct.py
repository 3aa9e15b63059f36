#!/usr/bin/env python
"""Baseline: each engine called directly (no HTTP, no backend of ours), N new tokens, concurrency 1 and 16.

What the serving benchmark's numbers are compared against. Every request generates exactly N tokens
(ignore_eos), greedy, from the same chat prompt; tokens/s = all generated tokens / wall time of the level.

- vllm: `vllm.LLM.generate` with a list of C prompts (offline batch: the engine's best case).
- openvino: `ContinuousBatchingPipeline.generate` with C prompts (its own step loop in C++).
- `--through-backend`: the same work as C concurrent `Backend.generate` streams of our VllmBackend /
  OpenVinoBackend in one asyncio loop (no HTTP), to see what our layer costs.

Usage (from the repository root, in an environment with the engines installed):

    DEMO=~/.cache/llm-endpoint/demo
    python scripts/bench_engines_direct.py --engine openvino --model $DEMO/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/bench_engines_direct.py --engine vllm --model $DEMO/SmolLM2-135M-Instruct --dtype bfloat16 --eager
    python scripts/bench_engines_direct.py --engine vllm ... --through-backend   # the same through our Backend
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def vllm_runner(model: str, dtype: str, new_tokens: int, eager: bool) -> Callable[[int], int]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=2048, enforce_eager=eager, disable_log_stats=True)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def run(concurrency: int) -> int:
        outputs = llm.generate([PROMPT] * concurrency, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    return run


def openvino_runner(model: str, dtype: str, new_tokens: int, eager: bool) -> Callable[[int], int]:
    import openvino_genai as ov_genai

    properties = {"INFERENCE_PRECISION_HINT": {"float32": "f32", "bfloat16": "bf16"}[dtype]} if dtype != "auto" else {}
    pipe = ov_genai.ContinuousBatchingPipeline(model, ov_genai.SchedulerConfig(), "CPU", properties)
    prompt_ids = pipe.get_tokenizer().encode(PROMPT, add_special_tokens=False).input_ids
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = new_tokens
    config.ignore_eos = True

    def run(concurrency: int) -> int:
        results = pipe.generate([prompt_ids] * concurrency, [config] * concurrency)
        return sum(len(r.m_generation_ids[0]) for r in results)

    return run


def backend_runner(engine: str, model: str, dtype: str, new_tokens: int, eager: bool) -> Callable[[int], int]:
    import asyncio

    from backends.model_files import load_tokenizer, locate_model
    from backends.types import GenerationRequest, SamplingParams
    from server.config import ServingConfig

    if engine == "vllm":
        from backends.vllm_backend import VllmBackend as backend_class
    else:
        from backends.openvino_backend import OpenVinoBackend as backend_class
    files = locate_model(model)
    tokenizer = load_tokenizer(files)
    dtypes = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}
    config = ServingConfig(model_id=model, dtype=dtypes[dtype], enforce_eager=eager, max_model_len=2048)
    backend = backend_class(config, files, tokenizer, 2048)
    backend.load()
    prompt_ids = tuple(tokenizer.encode(PROMPT))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    loop = asyncio.new_event_loop()  # one loop for every level: vLLM's output handler stays on it

    async def one(request_id: str) -> int:
        return sum([1 async for _ in backend.generate(GenerationRequest(request_id, prompt_ids, params))])

    async def level(concurrency: int) -> int:
        return sum(await asyncio.gather(*(one(f"{concurrency}-{i}-{time.monotonic_ns()}") for i in range(concurrency))))

    return lambda concurrency: loop.run_until_complete(level(concurrency))


RUNNERS = {"vllm": vllm_runner, "openvino": openvino_runner}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=RUNNERS, required=True)
    parser.add_argument("--model", required=True, help="HF directory (vllm) or .gguf / IR directory (openvino)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--eager", action="store_true", help="vllm: enforce_eager (no torch.compile)")
    parser.add_argument("--through-backend", action="store_true", help="drive our Backend instead of the engine")
    args = parser.parse_args()

    started = time.perf_counter()
    model = os.path.expanduser(args.model)
    if args.through_backend:
        run = backend_runner(args.engine, model, args.dtype, args.new_tokens, args.eager)
    else:
        run = RUNNERS[args.engine](model, args.dtype, args.new_tokens, args.eager)
    rows = [{"engine": args.engine, "through_backend": args.through_backend,
             "startup_s": round(time.perf_counter() - started, 1), "load_avg_1m": os.getloadavg()[0]}]
    run(2)  # warm-up
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        t0 = time.perf_counter()
        tokens = run(concurrency)
        wall = time.perf_counter() - t0
        rows.append({"concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 2),
                     "tok_per_s": round(tokens / wall, 1)})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
