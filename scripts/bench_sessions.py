#!/usr/bin/env python
"""Stateful sessions and attention sinks: the StreamingLLM paper's perplexity experiment on our engine, one
endless session, and how much of a session's history each engine reuses.

Part 1, `ppl`: teacher-forced log-probs of one long offline text (CPython's `pydoc_data/topics.py`, the first
`--tokens` tokens) through our engine's prefill (`decoder_input_details`), per segment, for
  - dense attention, as far as the model's positions go (8192 for the demo model);
  - window attention without sinks (attention_sinks=0, the window of the sinks arm);
  - sinks: attention_sinks=4 + attention_window=W;
  - a sliding window with recomputation (each sampled token scored by a fresh forward over the W tokens before
    it: transformers, the same dtype; every `--stride`-th token, since each costs a whole window);
with peak resident memory added by each arm (its own child process) and milliseconds per scored token.

Part 2, `session`: one stateful session on a real server (sessions on, sinks 4 + `--window`), fed turns
of `--turn-tokens` tokens of the same text and `--new-tokens` generated tokens each, until the session holds
`--session-tokens`; reports ms per generated token (median inter-token gap of the last three turns'
streams) and the server's RSS at 1k, 10k, 100k... tokens.

Part 3, `reuse`: per backend (`--backends`), a server with sessions on; a session's first turn carries
`--history-tokens` tokens of the text, then its second turn a short question: time to first token of that
turn against a stateless request of the same length whose history the engine has never seen (the cost
without reuse), and the prompt tokens reported as served from cache (`llm_session_prompt_tokens_total`).

Usage (repository root, quiet machine; ~25 minutes on 2 cores; OpenVINO needs LLM_ENDPOINT_OPTIMUM_CLI):

    .venv/bin/python scripts/bench_sessions.py [ppl|session|reuse|all] [--model-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SEGMENTS = (0, 1024, 2048, 4096, 8192, 16384)
SINKS = 4


def _text() -> str:
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__).read_text(encoding="utf-8")


def _kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from llm_endpoint.server.config import cache_root
    from llm_endpoint.server.demo_model import prepare_demo_model

    return prepare_demo_model(cache_root(os.environ))


# ---- part 1: perplexity, one arm per child process ------------------------------------------------


def _arm_engine(model_dir: str, ids: list[int], options: dict[str, str]) -> dict[str, Any]:
    import asyncio

    os.environ.update({"OPTION_ROLLING_BATCH": "scheduler", **{f"OPTION_{k.upper()}": v for k, v in options.items()}})
    from llm_endpoint.backends.registry import create_backend
    from llm_endpoint.backends.types import GenerationRequest, SamplingParams
    from llm_endpoint.server.cli import prepare_model
    from llm_endpoint.server.config import load_config

    config = load_config(Path(model_dir), os.environ)
    files, tokenizer, max_model_len = prepare_model(config)
    backend = create_backend(config, files, tokenizer, max_model_len)
    backend.load()
    if not config.attention_sinks_enabled:
        ids = ids[: max_model_len - 1]
    request = GenerationRequest("ppl", tuple(ids), SamplingParams(max_new_tokens=1, prompt_logprobs=True))

    async def score() -> list[float]:
        async for event in backend.generate(request):
            if event.prefill is not None:
                return [t.log_prob for t in event.prefill[1:] if t.log_prob is not None]
        raise RuntimeError("no prompt log-probs")

    time.sleep(1)
    before = _kib("self", "VmRSS")
    _reset_peak()
    started = time.perf_counter()
    logprobs = asyncio.run(score())
    seconds = time.perf_counter() - started
    backend.shutdown()
    return {"positions": list(range(1, len(logprobs) + 1)), "logprobs": logprobs, "seconds": seconds,
            "added_mib": (_kib("self", "VmHWM") - before) / 1024}


def _arm_recompute(model_dir: str, ids: list[int], window: int, stride: int, dtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    positions = list(range(stride, len(ids), stride))
    before = _kib("self", "VmRSS")
    _reset_peak()
    started = time.perf_counter()
    logprobs = []
    for t in positions:
        context = torch.tensor([ids[max(0, t - window) : t]])
        logits = model(context).logits[0, -1].float()
        logprobs.append(torch.log_softmax(logits, -1)[ids[t]].item())
    return {"positions": positions, "logprobs": logprobs, "seconds": time.perf_counter() - started,
            "added_mib": (_kib("self", "VmHWM") - before) / 1024}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["arm"] == "recompute":
        return _arm_recompute(spec["model_dir"], spec["ids"], spec["window"], spec["stride"], spec["dtype"])
    return _arm_engine(spec["model_dir"], spec["ids"], spec["options"])


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(spec), capture_output=True,
                            text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"arm {spec['arm']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _segments(positions: list[int], logprobs: list[float], end: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    bounds = [b for b in SEGMENTS if b < end] + [end]
    for lo, hi in zip(bounds, bounds[1:]):
        chosen = [lp for p, lp in zip(positions, logprobs) if lo <= p < hi]
        out[f"{lo}-{hi}"] = math.exp(-statistics.fmean(chosen)) if chosen else None
    return out


def run_ppl(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(_text())["input_ids"][: args.tokens]
    window = args.window
    common = {"dtype": args.dtype}
    arms = {
        "dense": {"arm": "engine", "options": common},
        f"window {window} (no sinks)": {"arm": "engine", "options": {**common, "attention_sinks": "0",
                                                                       "attention_window": str(window + SINKS)}},
        f"sinks {SINKS} + window {window}": {"arm": "engine", "options": {**common, "attention_sinks": str(SINKS),
                                                                         "attention_window": str(window)}},
        f"sliding window {window + SINKS} with recomputation": {
            "arm": "recompute", "window": window + SINKS, "stride": args.stride,
            "dtype": "bfloat16" if args.dtype == "bf16" else "float32"},
    }
    results: dict[str, Any] = {"tokens": len(ids), "arms": {}}
    for name, spec in arms.items():
        print(f"[ppl] {name} ...", file=sys.stderr, flush=True)
        out = _run_child({**spec, "model_dir": str(model_dir), "ids": ids})
        scored = len(out["logprobs"])
        results["arms"][name] = {
            "scored_tokens": scored,
            "ppl": _segments(out["positions"], out["logprobs"], len(ids)),
            "ms_per_token": 1000 * out["seconds"] / scored,
            "added_mib": out["added_mib"],
        }
    return results


# ---- part 2: one long session through the server -------------------------------------------------


def run_session(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import requests
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from tests.conftest import start_server

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text_ids = tokenizer(_text())["input_ids"]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(model_dir, {"dtype": args.dtype, "enable_stateful_sessions": "true",
                                      "attention_sinks": str(SINKS), "attention_window": str(args.window)},
                          log_dir, "scheduler")
    checkpoints = [c for c in (1_000, 10_000, 100_000, 1_000_000) if c <= args.session_tokens]
    rows = []
    try:
        url = server.url + "/invocations"
        res = requests.post(url, json={"requestType": "NEW_SESSION"}, timeout=30)
        session = res.headers["X-Amzn-SageMaker-Session-Id"].split(";")[0]
        held, cursor, turn = 0, 0, 0
        recent: list[list[float]] = []
        while checkpoints:
            chunk = text_ids[cursor : cursor + args.turn_tokens] or text_ids[: args.turn_tokens]
            cursor = (cursor + args.turn_tokens) % max(1, len(text_ids) - args.turn_tokens)
            body = {"inputs": tokenizer.decode(chunk), "stream": True,
                    "parameters": {"max_new_tokens": args.new_tokens, "ignore_eos_token": True}}
            stamps = []
            started = time.perf_counter()
            with requests.post(url, json=body, headers={"X-Amzn-SageMaker-Session-Id": session}, stream=True,
                               timeout=600) as stream:
                stream.raise_for_status()
                for line in stream.iter_lines():
                    if line:
                        stamps.append(time.perf_counter())
                        if "error" in json.loads(line):
                            raise RuntimeError(line)
            turn += 1
            held += len(chunk) + args.new_tokens
            recent.append([b - a for a, b in zip(stamps, stamps[1:])])
            del recent[:-3]
            if held >= checkpoints[0]:  # the median gap over the last three turns, to damp one noisy turn
                rows.append({"session_tokens": held, "turn": turn,
                             "ms_per_token": 1000 * statistics.median(g for gaps in recent for g in gaps),
                             "turn_seconds": time.perf_counter() - started,
                             "server_rss_mib": _kib(server.process.pid, "VmRSS") / 1024})
                print(f"[session] {rows[-1]}", file=sys.stderr, flush=True)
                checkpoints.pop(0)
    finally:
        server.stop()
    return {"turn_tokens": args.turn_tokens, "new_tokens": args.new_tokens, "rows": rows}


def _first_token_seconds(url: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    import requests

    started = time.perf_counter()
    first = None
    with requests.post(url, json={**body, "stream": True}, headers=headers, stream=True, timeout=600) as res:
        res.raise_for_status()
        for line in res.iter_lines():  # to the end: an abandoned turn would not join the session
            if line and first is None:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("empty stream")
    return first


def run_reuse(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import requests
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from tests.conftest import start_server

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text_ids = tokenizer(_text())["input_ids"]
    n = args.history_tokens
    seen, unseen = tokenizer.decode(text_ids[:n]), tokenizer.decode(text_ids[n : 2 * n])
    question = {"max_new_tokens": 8, "ignore_eos_token": True}
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    rows = {}
    for backend in args.backends.split(","):
        server = start_server(model_dir, {"enable_stateful_sessions": "true"}, Path(args.log_dir), backend)
        try:
            url = server.url + "/invocations"
            res = requests.post(url, json={"requestType": "NEW_SESSION"}, timeout=30)
            session = {"X-Amzn-SageMaker-Session-Id": res.headers["X-Amzn-SageMaker-Session-Id"].split(";")[0]}
            first = requests.post(url, json={"inputs": seen, "parameters": question}, headers=session, timeout=600)
            first.raise_for_status()
            reply = first.json()["generated_text"]
            cold_body = {"inputs": unseen + reply + " Summarize this.", "parameters": question}
            _first_token_seconds(url, {"inputs": "warm-up", "parameters": question}, {})
            warm = _first_token_seconds(url, {"inputs": " Summarize this.", "parameters": question}, session)
            cold = _first_token_seconds(url, cold_body, {})
            metrics = requests.get(server.url + "/metrics", timeout=10).text
            cached = next(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith('llm_session_prompt_tokens_total{source="cache"}'))
            rows[backend] = {"ttft_session_s": warm, "ttft_unseen_s": cold, "speedup": cold / warm,
                             "cached_prompt_tokens": cached}
            print(f"[reuse] {backend}: {rows[backend]}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    return {"history_tokens": n, "backends": rows}


def _report(doc: dict[str, Any]) -> None:
    if "ppl" in doc:
        ppl = doc["ppl"]
        names = list(next(iter(ppl["arms"].values()))["ppl"])
        print(f"\nperplexity per token segment ({ppl['tokens']} tokens of pydoc_data/topics.py)")
        print("| arm | " + " | ".join(names) + " | ms/token | peak MiB added |")
        print("|---|" + "---|" * (len(names) + 2))
        for name, arm in ppl["arms"].items():
            cells = [f"{arm['ppl'][n]:.2f}" if arm["ppl"][n] is not None else "-" for n in names]
            print(f"| {name} | " + " | ".join(cells) + f" | {arm['ms_per_token']:.2f} | {arm['added_mib']:.0f} |")
    if "reuse" in doc:
        print(f"\nsecond turn of a session after {doc['reuse']['history_tokens']} history tokens: time to first token")
        print("| backend | session turn s | same length, unseen s | speedup | prompt tokens from cache |")
        print("|---|---|---|---|---|")
        for name, row in doc["reuse"]["backends"].items():
            print(f"| {name} | {row['ttft_session_s']:.2f} | {row['ttft_unseen_s']:.2f} | {row['speedup']:.1f}x | "
                  f"{row['cached_prompt_tokens']:.0f} |")
    if "session" in doc:
        print("\none session, sinks on: ms per generated token and server RSS")
        print("| session tokens | ms/token | server RSS MiB |")
        print("|---|---|---|")
        for row in doc["session"]["rows"]:
            print(f"| {row['session_tokens']} | {row['ms_per_token']:.1f} | {row['server_rss_mib']:.0f} |")


def main() -> None:
    if "--child" in sys.argv:
        print(json.dumps(_child(json.loads(sys.stdin.read()))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=["ppl", "session", "reuse", "all"])
    parser.add_argument("--model-dir")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tokens", type=int, default=20480, help="tokens of text scored (part 1)")
    parser.add_argument("--window", type=int, default=1020, help="attention_window (parts 1 and 2)")
    parser.add_argument("--stride", type=int, default=64, help="score every n-th token with recomputation")
    parser.add_argument("--session-tokens", type=int, default=100_000)
    parser.add_argument("--turn-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--history-tokens", type=int, default=1500, help="first turn's length (part 3)")
    parser.add_argument("--backends", default="scheduler,vllm,openvino", help="part 3")
    parser.add_argument("--log-dir", default="/tmp/bench_sessions_logs")
    parser.add_argument("--json")
    args = parser.parse_args()
    model_dir = _model_dir(args.model_dir)
    doc: dict[str, Any] = {}
    if args.part in ("ppl", "all"):
        doc["ppl"] = run_ppl(args, model_dir)
    if args.part in ("session", "all"):
        doc["session"] = run_session(args, model_dir)
    if args.part in ("reuse", "all"):
        doc["reuse"] = run_reuse(args, model_dir)
    _report(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
