#!/usr/bin/env python
"""Each engine called directly, in-process, without HTTP: the baseline `bench.py --direct` measures our server
against.

The engine is configured exactly as `llm-endpoint serve` configures it from the same OPTION_* environment
(`server.config.load_config`, `server.cli.prepare_model`, then the backend module's own `create_engine` /
`create_pipeline`), and is then driven through its own API, with none of our request path:

- vllm: `AsyncLLM.generate` streams (text prompt; vLLM tokenizes), one asyncio task per client.
- openvino: `ContinuousBatchingPipeline.add_request` and `step()` in a plain loop on this thread, tokens read
  from each request's handle after every step (what any driver of the pipeline does).
- scheduler, disable: our own engine through its `Backend.generate` (that is its API), without the server.

Same workload as the HTTP clients (`bench_workload`): C closed-loop clients, same prompts in the same order,
exactly N new tokens, greedy. TTFT/ITL are taken when the driver receives each token from the engine. Each
engine is asked for what our server's LMI stream carries, every token with its log-prob (vLLM `logprobs=1`,
OpenVINO `logprobs = 1`), so the comparison isolates what the server adds; on OpenVINO the log-probs alone
cost ~5% of throughput at c=16 (README, Performance).

Protocol: once the engine is loaded the process prints one JSON line `{"ready": ...}` on stdout, then answers
each JSON command line on stdin with one JSON line:

    {"warm_up": C}                                               -> {"errors": [...]}
    {"level": C, "requests_per_client": R, "max_new_tokens": N, "max_seconds": S}
                                                                 -> {"results": [...], "wall_s": W}

Whatever the libraries print goes to stderr. `--serve-args` (vllm) instead prints `{"args": [...], "env":
{...}}`: the `vllm serve` flags and environment that give vLLM's own server the same engine configuration.

Usage (from the repository root; bench.py normally starts it):

    OPTION_ROLLING_BATCH=vllm .venv/bin/python scripts/bench_direct.py --engine vllm
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_workload import (  # noqa: E402
    PROMPTS,
    WARM_UP_TOKENS,
    RequestResult,
    client_prompts,
    run_clients,
    warm_up,
    warm_up_prompts,
)

from llm_endpoint.backends.config import ServingConfig  # noqa: E402
from llm_endpoint.server.cli import prepare_model  # noqa: E402
from llm_endpoint.server.config import cache_root, load_config  # noqa: E402

ENGINES = ("scheduler", "disable", "vllm", "openvino")


class AsyncDriver:
    """Engines with an asyncio streaming API: one event loop for the whole run (vLLM binds its output
    handler to the loop of the first request)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count()

    def request_id(self) -> str:
        return f"direct-{next(self._ids)}"

    async def one(self, index: int, max_new_tokens: int) -> RequestResult:
        raise NotImplementedError

    def warm_up(self, concurrency: int) -> list[str]:
        return self.loop.run_until_complete(warm_up(self.one, concurrency))

    def level(self, concurrency: int, requests_per_client: int, max_new_tokens: int,
              max_seconds: float | None) -> tuple[list[RequestResult], float]:
        return self.loop.run_until_complete(
            run_clients(self.one, concurrency, requests_per_client, max_new_tokens, max_seconds))


class VllmDriver(AsyncDriver):
    def __init__(self, config: ServingConfig) -> None:
        super().__init__()
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from llm_endpoint.backends.vllm_backend import create_engine

        files, _tokenizer, max_model_len = prepare_model(config)
        self.engine = create_engine(config, files, max_model_len)
        self._params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1,
                                                output_kind=RequestOutputKind.DELTA)

    async def one(self, index: int, max_new_tokens: int) -> RequestResult:
        result = RequestResult(index)
        try:
            async for out in self.engine.generate(PROMPTS[index], self._params(max_new_tokens), self.request_id()):
                if new := len(out.outputs[0].token_ids):
                    result.arrived(new)
        except Exception as exc:
            return result.fail(f"{type(exc).__name__}: {exc}")
        return result.end(max_new_tokens)


class BackendDriver(AsyncDriver):
    """Our engine: `Backend.generate` with the prompt tokenized as the server tokenizes LMI `inputs`."""

    def __init__(self, config: ServingConfig) -> None:
        super().__init__()
        from llm_endpoint.backends.registry import create_backend

        files, self.tokenizer, max_model_len = prepare_model(config)
        self.backend = create_backend(config, files, self.tokenizer, max_model_len)
        self.backend.load()

    async def one(self, index: int, max_new_tokens: int) -> RequestResult:
        from llm_endpoint.backends.types import GenerationRequest, SamplingParams

        result = RequestResult(index)
        ids = tuple(self.tokenizer(PROMPTS[index], add_special_tokens=True)["input_ids"])
        request = GenerationRequest(self.request_id(), ids, SamplingParams(max_new_tokens=max_new_tokens,
                                                                           ignore_eos=True))
        try:
            async for _event in self.backend.generate(request):
                result.arrived(1)
        except Exception as exc:
            return result.fail(f"{type(exc).__name__}: {exc}")
        return result.end(max_new_tokens)


class OpenVinoDriver:
    """The pipeline's own step loop, on this thread: admit, step, read every handle, repeat."""

    def __init__(self, config: ServingConfig) -> None:
        import openvino_genai as ov_genai

        from llm_endpoint.backends.openvino.pipeline import create_pipeline, model_path

        files, tokenizer, _max_model_len = prepare_model(config)
        self.pipe = create_pipeline(config, model_path(config, files))
        # Token ids as our server computes them (the IR directory may not carry an OpenVINO tokenizer).
        self.prompt_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
        self._ov_genai = ov_genai
        self._ids = itertools.count()

    def _config(self, max_new_tokens: int) -> Any:
        config = self._ov_genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        config.ignore_eos = True
        config.logprobs = 1
        return config

    def _run(self, queues: list[list[int]], max_new_tokens: int,
             max_seconds: float | None) -> tuple[list[RequestResult], float]:
        """Each queue is one client's prompts, sent one after another."""
        import numpy as np
        import openvino as ov

        start = time.perf_counter()
        done: list[RequestResult] = []
        active: dict[int, tuple[Any, RequestResult]] = {}  # client -> (handle, result)

        def submit(client: int) -> None:
            if not queues[client] or (max_seconds and time.perf_counter() - start > max_seconds):
                return
            index = queues[client].pop(0)
            ids = ov.Tensor(np.asarray([self.prompt_ids[index]], dtype=np.int64))
            result = RequestResult(index)
            active[client] = (self.pipe.add_request(next(self._ids), ids, self._config(max_new_tokens)), result)

        for client in range(len(queues)):
            submit(client)
        while active:
            self.pipe.step()
            for client, (handle, result) in list(active.items()):
                new = 0
                while handle.can_read():
                    new += sum(len(out.generated_ids) for out in handle.read().values())
                if new:
                    result.arrived(new)
                status = handle.get_status()
                if status == self._ov_genai.GenerationStatus.RUNNING:
                    continue
                del active[client]
                if status == self._ov_genai.GenerationStatus.FINISHED:
                    done.append(result.end(max_new_tokens))
                else:
                    done.append(result.fail(f"the pipeline ended the request: {status.name}"))
                submit(client)
        return done, time.perf_counter() - start

    def warm_up(self, concurrency: int) -> list[str]:
        alone, together = warm_up_prompts(concurrency)
        results = [r for i in alone for r in self._run([[i]], WARM_UP_TOKENS, None)[0]]
        results += self._run([[i] for i in together], WARM_UP_TOKENS, None)[0]
        return [r.error for r in results if not r.ok and r.error]

    def level(self, concurrency: int, requests_per_client: int, max_new_tokens: int,
              max_seconds: float | None) -> tuple[list[RequestResult], float]:
        queues = [client_prompts(i, concurrency, requests_per_client) for i in range(concurrency)]
        return self._run(queues, max_new_tokens, max_seconds)


def vllm_serve_args(config: ServingConfig) -> dict[str, Any]:
    """`vllm serve` flags (every engine argument that differs from vLLM's default) and environment."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from llm_endpoint.backends.vllm_backend import engine_args, engine_env

    files, _tokenizer, max_model_len = prepare_model(config)
    ours = engine_args(config, files, max_model_len)
    default = AsyncEngineArgs(model=ours.model)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    options = {a.dest: a for a in parser._actions if a.option_strings}
    args: list[str] = ["--model", ours.model]
    for f in dataclasses.fields(AsyncEngineArgs):
        value = getattr(ours, f.name)
        if f.name == "model" or value == getattr(default, f.name):
            continue
        action = options[f.name]  # KeyError: an argument `vllm serve` cannot be given
        flag = next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return {"args": args, "env": {k: os.environ.get(k, v) for k, v in engine_env(config).items()}}


def make_driver(engine: str, config: ServingConfig) -> Any:
    if engine == "vllm":
        return VllmDriver(config)
    if engine == "openvino":
        return OpenVinoDriver(config)
    return BackendDriver(config)


def serve_commands(driver: Any, out: TextIO, started: float) -> None:
    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True, "startup_s": time.monotonic() - started, "pid": os.getpid()})
    for line in sys.stdin:
        command = json.loads(line)
        if "warm_up" in command:
            reply({"errors": driver.warm_up(command["warm_up"])})
        else:
            results, wall = driver.level(command["level"], command["requests_per_client"],
                                         command["max_new_tokens"], command.get("max_seconds"))
            reply({"results": [r.to_json() for r in results], "wall_s": wall})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--model-dir", type=Path, help="default: the demo model")
    parser.add_argument("--serve-args", action="store_true", help="vllm: print `vllm serve` flags and exit")
    args = parser.parse_args()
    # The protocol owns the real stdout; anything else written to fd 1 (by us, vLLM, its child processes)
    # lands on stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    started = time.monotonic()
    model_dir = args.model_dir
    if model_dir is None:
        from llm_endpoint.server.demo_model import prepare_demo_model

        model_dir = prepare_demo_model(cache_root(os.environ))
    environ = {**os.environ, "OPTION_ROLLING_BATCH": args.engine}
    config = load_config(model_dir, environ)
    if args.serve_args:
        if args.engine != "vllm":
            parser.error("--serve-args is for --engine vllm")
        out.write(json.dumps(vllm_serve_args(config)) + "\n")
        return 0
    serve_commands(make_driver(args.engine, config), out, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
