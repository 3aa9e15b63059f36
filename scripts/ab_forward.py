#!/usr/bin/env python
"""Before/after timing of our engine's forward: another revision's engine modules against the working
tree's (or, with `--compiled`, the tree's eager forward against its `CompiledDecode` step), in one process,
on the demo model, alternating call by call (so drift on a shared machine hits both).

Whole-server comparisons (`bench.py`) need minutes per level and move by 10-20% between runs on these
machines; a change to the forward is judged faster here first. The other revision is checked out into a
temporary git worktree and its forward's modules (`MODULES`) are loaded beside ours.

Usage (repository root, quiet machine):

    .venv/bin/python scripts/ab_forward.py --base HEAD~1 [--rows 1,16] [--context 200] [--dtype bf16]
    .venv/bin/python scripts/ab_forward.py --compiled --rows 1,2,4,8,16,32   # what option.compile_decode buys

Prints, per row count, the median forward (plus LM head) time of each side, the ratio, and whether the two
outputs are bit-identical (a compiled step is not: its largest difference in logits is printed instead).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODULES = ("linear", "block_cache", "forward_batch", "attention", "llama")  # in order: each imports earlier ones


def _load_revision(tree: Path) -> dict[str, ModuleType]:
    """The engine modules of the checkout at `tree`, under private names, wired to each other."""
    loaded: dict[str, ModuleType] = {}
    saved = {name: importlib.import_module(f"llm_endpoint.backends.torch_engine.{name}") for name in MODULES}
    try:
        for name in MODULES:
            spec = importlib.util.spec_from_file_location(f"base_{name}", tree / "backends/torch_engine" / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            # its imports of the modules before it resolve to the base revision's copies (and dataclasses
            # look their module up by name)
            sys.modules[f"llm_endpoint.backends.torch_engine.{name}"] = sys.modules[f"base_{name}"] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        sys.modules.update({f"llm_endpoint.backends.torch_engine.{name}": m for name, m in saved.items()})
    return loaded


def _side(modules: dict[str, Any], model: Any, rows: int, context: int, dtype: torch.dtype,
          forward: Callable[[Any, Any], torch.Tensor] | None = None) -> Callable[[], Any]:
    """One step of `modules`' forward (or of `forward`, e.g. a compiled step) plus the LM head (packed for
    oneDNN, as `ModelRunner` has it), on its own cache, over `rows` decode rows `context` tokens deep."""
    ForwardBatch, Span = modules["forward_batch"].ForwardBatch, modules["forward_batch"].Span
    shape = modules["block_cache"].AttentionShape.of(model.config)
    per_row = (context + rows) // 16 + 1  # row r's new token sits at position context + r
    cache = modules["block_cache"].PagedKVCache(
        num_layers=shape.layers, num_blocks=rows * per_row, block_size=16, num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, dtype=dtype, device=torch.device("cpu"))
    cache.clear(list(range(rows * per_row)))
    spans = [Span(r, 1, context + r, list(range(r * per_row, (r + 1) * per_row))) for r in range(rows)]
    batch = ForwardBatch.build(spans, [[100 + r] for r in range(rows)], block_size=16, group=shape.group,
                               dtype=dtype, device=torch.device("cpu"))
    step = forward or modules["llama"].LlamaForward(model)
    head = modules["linear"].PackedLinear(model.lm_head.weight, model.lm_head.bias)  # as the engine's runner
    return lambda: head(step(batch, cache)).float()


def _compiled_step(ours: dict[str, Any], model: Any, dtype: torch.dtype) -> Callable[[Any, Any], torch.Tensor]:
    """The working tree's compiled step for any row count, compiled here (a few minutes) on a scratch cache."""
    from llm_endpoint.backends.torch_engine.compiled_decode import CompiledDecode

    shape = ours["block_cache"].AttentionShape.of(model.config)
    decode = CompiledDecode(model, model.model.rotary_emb)
    scratch = ours["block_cache"].PagedKVCache(
        num_layers=shape.layers, num_blocks=64, block_size=16, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        dtype=dtype, device=torch.device("cpu"))
    decode.warm_up(scratch, list(range(64)), shape.group)
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    against = parser.add_mutually_exclusive_group(required=True)
    against.add_argument("--base", help="the revision to compare against (e.g. HEAD~1)")
    against.add_argument("--compiled", action="store_true",
                         help="compare the tree's eager forward against its compiled step (bf16/fp16 only)")
    parser.add_argument("--rows", default="1,16", help="decode rows per step, comma-separated")
    parser.add_argument("--context", type=int, default=200, help="tokens already in each row's cache")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per side and row count")
    parser.add_argument("--model-dir")
    args = parser.parse_args()

    import os

    from transformers import AutoModelForCausalLM

    from llm_endpoint.backends.torch_engine import attention
    from llm_endpoint.server.config import cache_root
    from llm_endpoint.server.demo_model import prepare_demo_model

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model_dir = Path(args.model_dir) if args.model_dir else prepare_demo_model(cache_root(os.environ))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attention.NAME)
    model.eval()
    ours = {name: importlib.import_module(f"llm_endpoint.backends.torch_engine.{name}") for name in MODULES}
    with torch.inference_mode():
        if args.compiled:
            base, base_forward = ours, _compiled_step(ours, model, dtype)
            print(f"the working tree's compiled step (base) against its eager forward (tree), {args.dtype}, "
                  f"context {args.context}")
        else:
            base, base_forward = _base_modules(args.base), None
            print(f"base {args.base} against the working tree, {args.dtype}, context {args.context}")
        for rows in (int(r) for r in args.rows.split(",")):
            sides = {"base": _side(base, model, rows, args.context, dtype, base_forward),
                     "tree": _side(ours, model, rows, args.context, dtype)}
            base_out, tree_out = sides["base"](), sides["tree"]()
            outputs = ("bit-identical" if torch.equal(base_out, tree_out)
                       else f"differ (largest logit difference {(base_out - tree_out).abs().max().item():.3g})")
            times: dict[str, list[float]] = {name: [] for name in sides}
            for i in range(args.calls + 3):
                for name in (("base", "tree") if i % 2 else ("tree", "base")):
                    started = time.perf_counter()
                    sides[name]()
                    if i >= 3:  # warm-up
                        times[name].append(time.perf_counter() - started)
            base_ms, tree_ms = (statistics.median(times[n]) * 1e3 for n in ("base", "tree"))
            print(f"rows {rows}: base {base_ms:.2f} ms, tree {tree_ms:.2f} ms, base/tree {base_ms / tree_ms:.3f}x, "
                  f"outputs {outputs}")


def _base_modules(revision: str) -> dict[str, ModuleType]:
    """`revision`'s engine modules, from a temporary worktree."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision],
                       check=True, capture_output=True)
        try:
            return _load_revision(tree)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


if __name__ == "__main__":
    main()
