#!/usr/bin/env python
"""Serving benchmark: our server over HTTP against the same engines called directly, against `vllm serve`
and against transformers' `generate`, all in one run on the same prompts.

Targets (each one a process this script starts, unless it is an external --peer):

- `--backend B[,B...]` (an `option.rolling_batch` value: scheduler, disable, vllm, openvino): `llm-endpoint
  serve` (`python -m server.cli serve`, OPTION_ROLLING_BATCH=B plus --server-option) on 127.0.0.1, driven over
  HTTP with the LMI streaming body below; `--api lmi,openai-chat` drives the same server with its OpenAI chat
  stream too, as target "B/openai-chat". `B+KEY=VALUE[+KEY=VALUE...]` is B with those options added (target
  named as written), e.g. `scheduler,scheduler+compile_decode=true` for an option's before/after.
- `--direct`: for every backend also `scripts/bench_direct.py` ("B-direct"): the same engine, configured by
  the same code from the same options, called in-process through its own API (vLLM's AsyncLLM, OpenVINO's
  ContinuousBatchingPipeline step loop, our engine's Backend) with no HTTP and none of our request path.
- `--vllm-serve`: vLLM's own OpenAI server (`vllm serve`), given the very engine arguments and environment
  our vllm backend uses (bench_direct.py --serve-args), driven with streaming /v1/completions, as two
  targets: "vllm-serve" (a plain request) and "vllm-serve-logprobs" (also asking each token's log-prob, the
  work every LMI stream does, since each token object carries its log_prob); with `--api ...,openai-chat` a
  third, "vllm-serve/openai-chat", against which "vllm/openai-chat" is the like-for-like pair (neither asks
  for log-probs).
- `--peer NAME=URL`: a server someone else started (--peer-api, --peer-model).
- `--hf-generate`: transformers' `model.generate` in this process (fp32, greedy, one prompt at a time).

Every LMI request is

    {"inputs": prompt, "parameters": {"max_new_tokens": N, "ignore_eos_token": true, "do_sample": false},
     "stream": true}

so each one generates exactly N tokens (one jsonlines line per token); OpenAI-style targets get the same
prompt, `max_tokens` = `min_tokens` = N, `ignore_eos`, temperature 0. The workload (bench_workload.py): at
each concurrency level C clients each send R = ceil(16 / C) requests back to back, client i's j-th request
using prompt (j*C + i) mod 16 of a fixed set of 16 English prompts (10-212 tokens), so every level sends every
prompt once and every target gets the same work.

Targets are measured one level at a time: by default each target runs all its levels and is stopped before
the next starts; with --interleave all targets are started first (an idle one uses memory, not CPU) and each
level runs on every target back to back, so a drift in background load over the run (a shared machine) does
not land on one target only. A level stops starting new requests after --max-level-seconds (in-flight ones
finish); the table then shows "requests: k of n".

Per request: TTFT (sent -> first token), ITL (gaps between token arrivals), end-to-end latency. Per level:
output tokens/s = all output tokens / wall time of the level, TTFT and ITL p50/p99 (numpy's linear
percentile over all requests' values, ITL pooled over all gaps, as vLLM's `benchmarks/serve.py`), request and
error counts (an error: HTTP status != 200, an in-band error line, a transport failure, or a token count != N),
and CPU seconds used by the client (this process), the target (its whole process tree) and everything else
on the machine ("other processes": check it is near 0, or the figures are not comparable).

Usage (from the repository root; OpenVINO needs LLM_ENDPOINT_OPTIMUM_CLI to convert the demo model):

    .venv/bin/python scripts/bench.py --hf-generate --interleave    # scheduler vs disable vs generate
    LLM_ENDPOINT_OPTIMUM_CLI=.venv-optimum/bin/optimum-cli .venv/bin/python scripts/bench.py \\
        --backend scheduler,vllm,openvino --direct --vllm-serve --interleave   # the engines' table
    .venv/bin/python scripts/bench.py --backend scheduler --concurrency 1,2,4,8,16 --json out.json
    .venv/bin/python scripts/bench.py --server-option dtype=bf16   # any OPTION_<KEY> for servers and drivers
    .venv/bin/python scripts/bench.py --backend scheduler --api openai-chat   # our /v1/chat/completions
    .venv/bin/python scripts/bench.py --backend vllm --vllm-serve --api lmi,openai-chat   # vllm vs serve, both ways
    .venv/bin/python scripts/bench.py --backend none --peer tgi=http://127.0.0.1:8000 --peer-api lmi

Output: a markdown table (target | concurrency | output tok/s | TTFT p50/p99 | ITL p50/p99 | requests |
errors), a CPU table, ratio lines (each backend / its engine direct; vllm / vllm-serve; the best backend /
vllm-serve; scheduler / disable; c_max / c1; c=1 / hf-generate), and with --json the raw numbers. Process logs
go to --log-dir (a temp dir by default) and are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_client import APIS
from bench_report import cpu_table, fmt, markdown_table, ratio_lines
from bench_stats import LevelResult, other_cpu, summarize
from bench_targets import (
    HttpTarget,
    Target,
    backend_variant,
    client_cpu_seconds,
    start_direct,
    start_server,
    start_vllm_serve,
    system_busy_cpu_seconds,
    tree_cpu_seconds,
)
from bench_workload import PROMPTS, RequestResult

from llm_endpoint.server.config import cache_root

# ---- levels ---------------------------------------------------------------------------------------


def requests_per_client_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests_per_client:
        return args.requests_per_client
    return max(1, math.ceil(args.requests_per_level / concurrency))


def warm_target(target: Target, args: argparse.Namespace) -> None:
    errors = target.warm_up(min(4, max(args.concurrency)))
    if errors:
        print(f"  {target.name} warm-up errors: {errors[:3]}", flush=True)


def bench_level(target: Target, concurrency: int, args: argparse.Namespace) -> LevelResult:
    time.sleep(args.settle_seconds)  # let the previous target's threads and in-flight work wind down
    r = requests_per_client_for(concurrency, args)
    pid = target.process.pid if target.process else None
    cpu0, srv0, sys0 = client_cpu_seconds(), tree_cpu_seconds(pid) if pid else None, system_busy_cpu_seconds()
    results, wall = target.run(concurrency, r, args.max_new_tokens, args.max_level_seconds)
    cpu1, srv1, sys1 = client_cpu_seconds(), tree_cpu_seconds(pid) if pid else None, system_busy_cpu_seconds()
    server_cpu = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    level = summarize(target.name, concurrency, results, wall, cpu1 - cpu0, server_cpu)
    level.other_cpu_s = other_cpu(sys0, sys1, (cpu1 - cpu0) + (server_cpu or 0.0))
    level.planned_requests = concurrency * r
    cut = f" (of {level.planned_requests}: time cap)" if level.planned_requests != level.requests else ""
    print(f"  {target.name} c={concurrency}: {level.requests} req{cut}, {level.output_tok_s:.1f} tok/s, "
          f"wall {level.wall_s:.1f} s, TTFT p50 {fmt(level.ttft_p50_ms)} ms, ITL p50 {fmt(level.itl_p50_ms)} ms, "
          f"errors {level.errors}, client CPU {level.client_cpu_s:.1f} s, "
          f"target CPU {fmt(level.server_cpu_s, 1)} s, other processes {fmt(level.other_cpu_s, 1)} s",
          flush=True)
    for err in level.error_samples:
        print(f"    error: {err}", flush=True)
    return level


# ---- transformers' own generate -------------------------------------------------------------------


def bench_hf_generate(model_dir: Path, max_new_tokens: int, max_seconds: float | None = None,
                      threads: int | None = None) -> tuple[LevelResult, dict[str, Any]]:
    """transformers `generate`, fp32, greedy, one prompt at a time, each prompt once; timed like a level."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Marks each new token's arrival (`put` is first called with the prompt)."""

        def __init__(self, result: RequestResult) -> None:
            self.result = result
            self._seen_prompt = False

        def put(self, value: Any) -> None:
            if self._seen_prompt:
                self.result.arrived(1)
            self._seen_prompt = True

        def end(self) -> None:
            pass

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    encoded = [tokenizer(p, add_special_tokens=True, return_tensors="pt") for p in PROMPTS]
    gen_kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                      else tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(**encoded[-1], **{**gen_kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        results = []
        cpu0, sys0 = client_cpu_seconds(), system_busy_cpu_seconds()
        start = time.perf_counter()
        for i, enc in enumerate(encoded):
            if max_seconds and time.perf_counter() - start > max_seconds:
                break
            result = RequestResult(i)
            out = model.generate(**enc, **gen_kwargs, streamer=TimingStreamer(result))
            results.append(result.end(max_new_tokens, out.shape[1] - enc["input_ids"].shape[1]))
        wall = time.perf_counter() - start
        cpu, sys1 = client_cpu_seconds() - cpu0, system_busy_cpu_seconds()
    level = summarize("hf-generate", 1, results, wall, cpu, None)
    level.other_cpu_s = other_cpu(sys0, sys1, cpu)
    level.planned_requests = len(encoded)
    lengths = [int(e["input_ids"].shape[1]) for e in encoded]
    info = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
                              "per_prompt": lengths}}
    return level, info


def prompt_token_lengths(model_dir: Path | None) -> list[int] | None:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:
        return None
    return [len(tok(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]


# ---- main -----------------------------------------------------------------------------------------


def _csv_ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return values


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def _api_list(text: str) -> list[str]:
    names = _csv(text)
    unknown = [n for n in names if n not in APIS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected request formats from {', '.join(sorted(APIS))}, got {text!r}")
    return list(dict.fromkeys(names))


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="model directory (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--backend", type=_csv, default=["scheduler", "disable"],
                   help="rolling_batch values to start our server with, in order, each optionally with "
                        "+KEY=VALUE options of its own; `none` for no server (default: scheduler,disable)")
    p.add_argument("--direct", action="store_true",
                   help="also run each backend's engine called directly (scripts/bench_direct.py)")
    p.add_argument("--vllm-serve", action="store_true",
                   help="also run `vllm serve` with the engine arguments our vllm backend uses, as two targets: "
                        "`vllm-serve` (plain completions) and `vllm-serve-logprobs` (also each token's log-prob)")
    p.add_argument("--concurrency", type=_csv_ints, default=[1, 4, 16], help="default: 1,4,16")
    p.add_argument("--requests-per-level", type=int, default=len(PROMPTS),
                   help="requests per concurrency level; R = ceil(this / C) per client (default: %(default)s, "
                        "i.e. every prompt once)")
    p.add_argument("--requests-per-client", type=int, help="R, overriding --requests-per-level")
    p.add_argument("--max-new-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    p.add_argument("--api", type=_api_list, default=["lmi"],
                   help=f"request formats for our servers, comma-separated ({', '.join(sorted(APIS))}): one target "
                        "per format on the same server, named B for the first and B/FORMAT for the others; with "
                        "--vllm-serve, openai-chat also drives vllm serve's chat endpoint (default: lmi)")
    p.add_argument("--server-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra OPTION_<KEY>=VALUE for our servers, the direct engines and vllm serve "
                        "(repeatable), e.g. dtype=bf16")
    p.add_argument("--server-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every started process (repeatable), e.g. OMP_NUM_THREADS=1")
    p.add_argument("--threads", type=int,
                   help="torch/OpenMP threads for started processes (OMP_NUM_THREADS) and for --hf-generate "
                        "(torch.set_num_threads); default: torch's own default (all cores)")
    p.add_argument("--max-level-seconds", type=float, default=90.0,
                   help="no new request starts after this long in one level (in-flight ones finish), so a "
                        "run stays bounded on a slow or busy machine; 0 = no cap (default: %(default)s)")
    p.add_argument("--settle-seconds", type=float, default=3.0,
                   help="idle pause before each level, so the previous target's leftover work (spinning thread "
                        "pools, engine loops winding down) does not land on the next (default: %(default)s)")
    p.add_argument("--peer", type=_key_value, action="append", default=[], metavar="NAME=URL",
                   help="also benchmark an already running server at URL (repeatable)")
    p.add_argument("--peer-api", choices=sorted(APIS), default="openai-completions")
    p.add_argument("--peer-model", help="`model` field for OpenAI-style peers")
    p.add_argument("--hf-generate", action="store_true",
                   help="also time transformers' model.generate on the same prompts")
    p.add_argument("--interleave", action="store_true",
                   help="start every target first and run each concurrency level on all of them back to back "
                        "(and HF after c=1), instead of one target at a time; fairer on a shared machine")
    p.add_argument("--log-dir", type=Path, help="where process logs go (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    return p.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the `finally` blocks that stop processes


def target_starters(args: argparse.Namespace, model_dir: Path, log_dir: Path) -> list[Callable[[], list[Target]]]:
    """Deferred starts, in report order: each backend's server then its engine direct, then `vllm serve`, then
    peers. One start may give several targets on one process; they are stopped together."""
    options = {f"OPTION_{k.upper()}": v for k, v in args.server_option}
    env = dict(args.server_env)
    if args.threads:
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    starters: list[Callable[[], list[Target]]] = []
    apis = [APIS[name] for name in args.api]
    for entry in args.backend:
        backend, extra = backend_variant(entry)
        variant = {**options, **extra}
        starters.append(lambda b=backend, o=variant, n=entry: start_server(b, model_dir, o, env, apis, log_dir, name=n))
        if args.direct and not extra:
            starters.append(lambda b=backend: [start_direct(b, model_dir, options, env, log_dir)])
    if args.vllm_serve:
        starters.append(lambda: start_vllm_serve(model_dir, options, env, log_dir, chat="openai-chat" in args.api))
    for name, url in args.peer:
        peer = HttpTarget(name, None, url=url.rstrip("/"), api=APIS[args.peer_api], model=args.peer_model)
        starters.append(lambda t=peer: [t])
    return starters


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    run_started = time.monotonic()
    model_dir = args.model_dir
    if model_dir is None:
        from llm_endpoint.server.demo_model import prepare_demo_model

        model_dir = prepare_demo_model(cache_root(os.environ))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="llm-endpoint-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"model: {model_dir}\nbackends: {args.backend} direct: {args.direct} vllm serve: {args.vllm_serve} "
          f"peers: {[n for n, _ in args.peer]}\nconcurrency: {args.concurrency} max_new_tokens: {args.max_new_tokens} "
          f"server options: {dict(args.server_option) or '-'} server env: {dict(args.server_env) or '-'}\n"
          f"logs: {log_dir}\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    levels: list[LevelResult] = []
    meta: list[dict[str, Any]] = []
    hf_level, hf_info = None, {}

    def run_hf() -> None:
        nonlocal hf_level, hf_info
        print("[hf-generate] transformers model.generate, fp32, greedy, one at a time", flush=True)
        try:
            hf_level, hf_info = bench_hf_generate(model_dir, args.max_new_tokens, args.max_level_seconds,
                                                  args.threads)
        except Exception as exc:  # keep the other results of a long run
            print(f"  hf-generate failed: {type(exc).__name__}: {exc}", flush=True)
            hf_info = {"error": f"{type(exc).__name__}: {exc}"}
            return
        print(f"  hf-generate: {hf_level.output_tok_s:.1f} tok/s, TTFT p50 {fmt(hf_level.ttft_p50_ms)} ms, "
              f"ITL p50 {fmt(hf_level.itl_p50_ms, 1)} ms, other processes {fmt(hf_level.other_cpu_s, 1)} s",
              flush=True)

    starters = target_starters(args, model_dir, log_dir)
    targets: list[Target] = []
    try:
        if not args.interleave:
            for start in starters:
                group = start()
                targets += group
                for target in group:
                    warm_target(target, args)
                    levels += [bench_level(target, c, args) for c in args.concurrency]
                for target in group:
                    target.stop()
            if args.hf_generate:
                run_hf()
        else:
            for start in starters:
                targets += start()
            for target in targets:
                warm_target(target, args)
            for i, c in enumerate(args.concurrency):
                levels += [bench_level(target, c, args) for target in targets]
                if args.hf_generate and i == 0:
                    run_hf()
    finally:
        for target in targets:
            target.stop()
        meta = [t.meta() for t in targets]
    lengths = hf_info.get("prompt_tokens", {}).get("per_prompt") or prompt_token_lengths(model_dir)

    order = [t.name for t in targets]
    levels.sort(key=lambda lv: (order.index(lv.config), lv.concurrency))
    all_levels = levels + ([hf_level] if hf_level else [])
    ratios = ratio_lines(levels, hf_level, args.backend)
    total = time.monotonic() - run_started
    print()
    print(f"## Results: {args.max_new_tokens} output tokens per request, greedy, ignore_eos; "
          f"{args.requests_per_level if not args.requests_per_client else 'R x C'} requests per level")
    if lengths:
        print(f"prompt tokens: {len(lengths)} prompts, min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, "
              f"max {max(lengths)}")
    print()
    print(markdown_table(all_levels))
    print()
    print(cpu_table(all_levels))
    print()
    for label, value in ratios:
        print(f"- {label}: {value:.2f}x")
    print(f"\nwall time of the whole run: {total:.0f} s")
    print("command: " + " ".join([Path(sys.executable).name, "scripts/bench.py"] + (argv if argv is not None
                                                                                     else sys.argv[1:])))

    if args.json:
        doc = {
            "argv": sys.argv, "model_dir": str(model_dir),
            "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "prompt_tokens": lengths, "targets": meta, "server_options": dict(args.server_option),
            "server_env": dict(args.server_env), "threads": args.threads, "interleave": args.interleave,
            "levels": [asdict(lv) for lv in all_levels], "hf_generate": hf_info or None,
            "ratios": dict(ratios), "wall_s": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"JSON: {args.json}")
    return 0 if all(lv.errors == 0 for lv in all_levels) else 1


if __name__ == "__main__":
    sys.exit(main())
