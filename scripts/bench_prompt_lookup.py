#!/usr/bin/env python
"""Prompt lookup decoding through our server: decode tokens/s with and without drafts, per backend, on
input-grounded prompts (repeat or edit a passage of CPython's `pydoc_data/topics.py`) and open-ended ones,
at concurrency 1 and 16, in one run on the demo model.

Each (backend, prompt lookup on/off) is one server (`option.prompt_lookup_num_tokens=K` or 0), both up at
once; every level runs `--repeats` times on each, the arms alternating, and the median is reported. Driven by
closed-loop clients (LMI streaming body, greedy, `--new-tokens` tokens with ignore_eos). Reported: output
tokens/s, the ratio to the same backend without drafts, the mean tokens per step (from the accepted drafts
in `llm_draft_tokens_total`) and, where the engine says how many it proposed (ours, vLLM), the acceptance
rate. The OpenVINO rows are GenAI's own prompt lookup, on the same prompts.

Usage (repository root, quiet machine; ~20 minutes on 2 cores; OpenVINO needs LLM_ENDPOINT_OPTIMUM_CLI):

    .venv/bin/python scripts/bench_prompt_lookup.py [--backends scheduler,vllm,openvino] [--k 4] [--json out.json]

A backend may carry options of its own, `B+KEY=VALUE` (e.g. `scheduler+compile_decode=true`), as in bench.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _passages(tokenizer: Any, count: int, tokens: int) -> list[str]:
    import pydoc_data.topics

    ids = tokenizer(Path(pydoc_data.topics.__file__).read_text(encoding="utf-8"))["input_ids"]
    step = len(ids) // (count + 1)
    return [tokenizer.decode(ids[(i + 1) * step : (i + 1) * step + tokens]) for i in range(count)]


def prompts(tokenizer: Any) -> dict[str, list[str]]:
    passages = _passages(tokenizer, 4, 300)
    grounded = [f"Repeat the following text exactly.\n\nText:\n{p}\n\nRepeated text:\n" for p in passages[:2]]
    grounded += [f"Here is some documentation.\n\n{p}\n\nRewrite it with every 'the' in capitals:\n" for p in passages[2:]]
    open_ended = ["Write a short story about a dragon who learns to bake bread.",
                  "Explain why the sky is blue to a ten-year-old.",
                  "List some ideas for a weekend trip in the mountains, with reasons.",
                  "Describe a day in the life of a lighthouse keeper."]
    return {"grounded": grounded, "open-ended": open_ended}


def _one(url: str, prompt: str, new_tokens: int) -> int:
    body = {"inputs": prompt, "stream": True, "parameters": {"max_new_tokens": new_tokens, "ignore_eos_token": True}}
    count = 0
    with requests.post(url + "/invocations", json=body, stream=True, timeout=900) as res:
        res.raise_for_status()
        for line in res.iter_lines():
            if line:
                if b'"error"' in line:
                    raise RuntimeError(line.decode())
                count += 1
    return count


def _level(url: str, texts: list[str], concurrency: int, requests_per_level: int, new_tokens: int) -> dict[str, float]:
    jobs = [texts[i % len(texts)] for i in range(requests_per_level)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda p: _one(url, p, new_tokens), jobs))
    return {"tokens": tokens, "seconds": time.perf_counter() - started,
            "tok_s": tokens / (time.perf_counter() - started)}


def _drafts(url: str) -> dict[str, float]:
    out = {"proposed": 0.0, "accepted": 0.0}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        for key in out:
            if line.startswith(f'llm_draft_tokens_total{{result="{key}"}}'):
                out[key] = float(line.split()[-1])
    return out


def main() -> None:
    from bench_targets import backend_variant
    from transformers import AutoTokenizer

    from tests.conftest import start_server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="scheduler,vllm,openvino")
    parser.add_argument("--k", type=int, default=4, help="option.prompt_lookup_num_tokens when on")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model-dir")
    parser.add_argument("--log-dir", default="/tmp/bench_prompt_lookup_logs")
    parser.add_argument("--prompts", default="grounded,open-ended")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level per arm, alternating arms")
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: twice max(prompts, c)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        import os

        from llm_endpoint.server.config import cache_root
        from llm_endpoint.server.demo_model import prepare_demo_model

        model_dir = prepare_demo_model(cache_root(os.environ))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sets = {kind: texts for kind, texts in prompts(tokenizer).items() if kind in args.prompts.split(",")}
    levels = [int(c) for c in args.concurrency.split(",")]
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for entry in args.backends.split(","):
        backend, options = backend_variant(entry)
        # both servers up at once and their levels interleaved, so drift on a shared machine hits both arms
        servers = {k: start_server(model_dir, {"prompt_lookup_num_tokens": str(k)}, Path(args.log_dir), backend,
                                   options)
                   for k in (0, args.k)}
        try:
            for server in servers.values():
                _one(server.url, "warm-up", 4)
            for kind, texts in sets.items():
                for c in levels:
                    runs: dict[int, list[dict[str, float]]] = {k: [] for k in servers}
                    for rep in range(args.repeats):
                        for k in sorted(servers, reverse=bool(rep % 2)):
                            url = servers[k].url
                            before = _drafts(url)
                            result = _level(url, texts, c, args.requests_per_level or 2 * max(len(texts), c),
                                            args.new_tokens)
                            after = _drafts(url)
                            result.update({key: after[key] - before[key] for key in after})
                            runs[k].append(result)
                    for k, results in runs.items():
                        proposed = sum(r["proposed"] for r in results)
                        accepted = sum(r["accepted"] for r in results)
                        tokens = sum(r["tokens"] for r in results)
                        row = {"backend": entry, "k": k, "prompts": kind, "concurrency": c,
                               "tok_s": statistics.median(r["tok_s"] for r in results),
                               "tok_s_runs": [round(r["tok_s"], 1) for r in results],
                               "acceptance": accepted / proposed if proposed else None,
                               "tokens_per_step": tokens / (tokens - accepted) if k and tokens > accepted else None}
                        rows.append(row)
                        print(f"[pld] {row}", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()
    base = {(r["backend"], r["prompts"], r["concurrency"]): r["tok_s"] for r in rows if r["k"] == 0}
    print("\ntok/s: the median of --repeats runs per arm, the arms' runs alternating")
    print("\n| backend | prompts | c | prompt lookup | tok/s | vs off | acceptance | tokens/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["tok_s"] / base[r["backend"], r["prompts"], r["concurrency"]]
        acceptance = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        per_step = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] is not None else "-"
        print(f"| {r['backend']} | {r['prompts']} | {r['concurrency']} | {'k=' + str(r['k']) if r['k'] else 'off'} | "
              f"{r['tok_s']:.1f} | {ratio:.2f}x | {acceptance} | {per_step} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
