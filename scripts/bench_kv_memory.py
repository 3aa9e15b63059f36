#!/usr/bin/env python
"""Peak memory of one long request among many short ones: our engine's KV cache now against a baseline
revision (default: the last one with the per-slot `SlotKVCache`), in one run.

Workload: 31 short requests (16-60 prompt tokens, 64 new tokens each) and one request with a ~8k-token
prompt (16 new tokens), all submitted at once to our engine (`rolling_batch=scheduler`, bf16, 32 slots,
`max_model_len` 8192), driven in-process through `Backend.generate` with no HTTP. Each engine runs in its
own child process; the baseline's code comes from `git archive` of the revision, imported through a
two-symlink `llm_endpoint` package placed first on PYTHONPATH.

Reported per engine: resident memory added by the run (peak VmHWM, reset after warm-up, minus VmRSS
before), and the KV bytes of the tokens held at the busiest moment (a lower bound: a request's tokens count
from its first output token to its last, prompt included; what is still being prefilled is not counted), so
`added / held` is an upper bound on what the cache costs per token it holds.

Usage (repository root, quiet machine; ~5 minutes on 2 cores):

    .venv/bin/python scripts/bench_kv_memory.py [--baseline-rev 97c0ffe] [--model-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "97c0ffe"  # the last revision with SlotKVCache ([slots, heads, capacity, dim] per layer)
SHORT_REQUESTS = 31
SHORT_NEW_TOKENS = 64
LONG_PROMPT_TOKENS = 8000
LONG_NEW_TOKENS = 16
SLOTS = 32
MAX_MODEL_LEN = 8192


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---- child: one engine, one run ------------------------------------------------------------------


def _child(model_dir: str) -> dict[str, Any]:
    os.environ.update({
        "OPTION_ROLLING_BATCH": "scheduler", "OPTION_DTYPE": "bf16", "OPTION_MAX_ROLLING_BATCH_SIZE": str(SLOTS),
        "OPTION_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "OPTION_COMPILE_DECODE": "false",  # what is measured is the KV cache, not compiled weights
    })
    from llm_endpoint.backends.registry import create_backend
    from llm_endpoint.backends.types import GenerationRequest, SamplingParams
    from llm_endpoint.server.cli import prepare_model
    from llm_endpoint.server.config import load_config

    config = load_config(Path(model_dir), os.environ)
    files, tokenizer, max_model_len = prepare_model(config)
    backend = create_backend(config, files, tokenizer, max_model_len)
    backend.load()
    import torch
    from transformers import AutoConfig

    # from the config here, not the engine's helper: the baseline revision's tree has none
    model_config = AutoConfig.from_pretrained(model_dir)
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_bytes_per_token = 2 * model_config.num_hidden_layers * kv_heads * head_dim * torch.bfloat16.itemsize

    text = ("The lighthouse keeper counted the ships that passed in the night, and wrote each name in a "
            "ledger that grew heavier every year. ")
    long_ids = (tokenizer(text * 400)["input_ids"])[:LONG_PROMPT_TOKENS]
    prompts = [tuple(long_ids)] + [
        tuple(tokenizer(f"Question {i}: " + "tell me about the sea " * (1 + i % 12))["input_ids"])
        for i in range(SHORT_REQUESTS)
    ]
    held = [0] * len(prompts)  # tokens a request holds while it is running (after its first output token)
    peak = {"tokens": 0, "blocks": 0}

    def sample_blocks() -> None:
        blocks = getattr(backend.stats(), "kv_blocks_used", 0)
        peak["blocks"] = max(peak["blocks"], blocks)

    async def one(index: int | None, ids: tuple[int, ...], new: int) -> None:
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        emitted = 0
        async for event in backend.generate(GenerationRequest(f"m{index}", ids, params)):
            emitted += 1
            if index is None:  # the warm-up
                continue
            held[index] = 0 if event.finished else len(ids) + emitted
            peak["tokens"] = max(peak["tokens"], sum(held))
            sample_blocks()

    async def run() -> tuple[int, float]:
        await one(None, prompts[1], 4)  # warm-up, so the run's peak is not the first step's allocations
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss_before = _status_kib("VmRSS")
        start = time.monotonic()
        await asyncio.gather(*(one(i, ids, LONG_NEW_TOKENS if i == 0 else SHORT_NEW_TOKENS)
                               for i, ids in enumerate(prompts)))
        wall = time.monotonic() - start
        return rss_before, wall

    rss_before, wall = asyncio.run(run())
    peak_kib = _status_kib("VmHWM")
    backend.shutdown()
    return {
        "rss_before_mib": rss_before / 1024, "peak_mib": peak_kib / 1024,
        "added_mib": (peak_kib - rss_before) / 1024,
        "peak_tokens_held": peak["tokens"], "kv_bytes_per_token": kv_bytes_per_token,
        "held_kv_mib": peak["tokens"] * kv_bytes_per_token / 2**20,
        "peak_kv_blocks_used": peak["blocks"], "wall_s": wall,
        "prompt_tokens": [len(p) for p in prompts],
    }


# ---- parent: both engines ------------------------------------------------------------------------


def _baseline_tree(rev: str, into: Path) -> Path:
    """`rev`'s server/ and backends/ under `into`, and a PYTHONPATH entry that imports them as llm_endpoint."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "server", "backends"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into / "tree", filter="data")
    package = into / "shim" / "llm_endpoint"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("server", "backends"):
        (package / name).symlink_to(into / "tree" / name)
    return into / "shim"


def _run_child(model_dir: str, pythonpath: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, __file__, "--child", "--model-dir", model_dir], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE)
    parser.add_argument("--model-dir", default=None, help="default: the demo model (downloaded if missing)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        from llm_endpoint.server.config import cache_root
        from llm_endpoint.server.demo_model import prepare_demo_model

        model_dir = str(prepare_demo_model(cache_root(os.environ)))
    if args.child:
        print(json.dumps(_child(model_dir)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {"baseline " + args.baseline_rev: _run_child(model_dir, _baseline_tree(args.baseline_rev, Path(tmp))),
                   "paged (this tree)": _run_child(model_dir, None)}
    print(f"\n31 short requests ({SHORT_NEW_TOKENS} new tokens) + one {LONG_PROMPT_TOKENS}-token prompt "
          f"({LONG_NEW_TOKENS} new), {SLOTS} slots, max_model_len {MAX_MODEL_LEN}, bf16\n")
    print("| cache | RSS added (MiB) | KV of tokens held at peak (MiB) | added / held | peak KV blocks | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        blocks = r["peak_kv_blocks_used"] or "-"
        print(f"| {name} | {r['added_mib']:.0f} | {r['held_kv_mib']:.0f} ({r['peak_tokens_held']} tokens) | "
              f"{r['added_mib'] / r['held_kv_mib']:.2f}x | {blocks} | {r['wall_s']:.1f} |")
    print("\ncommand: python scripts/bench_kv_memory.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
