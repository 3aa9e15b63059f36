"""Decode steps through torch.compile (`option.compile_decode`; by default a lone row's steps only, see
`engine.compile_by_default_reason`): the same Llama-family arithmetic as `llama.LlamaForward`, written for
inductor with frozen weights and its C++ wrapper, for steps whose rows are all single decode tokens attending
as one group, and a lone sequence's draft verification.

Why: one stream here is bound by the ~420 small operator calls a decode step makes between its matmuls
(norms, RoPE, cache writes, SiLU, residual adds; ~5.6 of ~20.5 ms at one row on the demo model, measured),
which eager PyTorch cannot fuse. Inductor fuses them into a few C++ kernels, packs the weights for oneDNN
itself (freezing) and calls everything from C++ (cpp_wrapper): 16.5 ms against 20.8 ms for our eager
forward in the same process (README, Performance). From a few rows on, the matmuls and the attention
dominate and the compiled step is no faster than the eager one (in one process: 1.07-1.24x at one and two rows,
0.98-1.10x at 4 to 32), which is why `auto` compiles a lone row's steps only. In the one-row graph the
projections are our AVX-512 BF16 kernel (`gemv`) where it runs, not oneDNN: there the step is nearly all
matrix-vector products, which the kernel streams at close to the memory bandwidth (on a 2-core AMD EPYC Zen 5,
against our eager forward in the same process: 1.38-1.45x with the kernel, 1.14-1.21x with oneDNN). The cost:
one compile per graph (one row, any other row count, and a drafting row; ~30-75 s each, done at start-up;
inductor's on-disk cache cannot keep them, since the packed weights do not pickle), and a copy of the weights
beside the eager ones (inductor's packed one for several rows and drafts; the fused q/k/v and gate/up weights
for the kernel; prefill chunks stay eager). In fp32 our eager forward equals transformers' bit for bit and
this one would not, so it serves bf16/fp16 only.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from llm_endpoint.backends.torch_engine import gemv, llama
from llm_endpoint.backends.torch_engine.block_cache import AttentionShape, PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import GROUPED_MAX_TOKENS, ForwardBatch, Span

log = logging.getLogger(__name__)

_INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}
_WARM_UP_ROWS, _WARM_UP_SPAN, _WARM_UP_WIDTH = 7, 3, 5


class _Linears(torch.nn.Module):
    """One projection per layer, with its bias where the checkpoint has one (Qwen2's q/k/v; Llama's
    `attention_bias` and `mlp_bias`). A lone row goes through our bf16 kernel where it runs (`gemv`: ~1.17x
    oneDNN's products at one row), more rows through oneDNN (freezing packs the weights for it)."""

    def __init__(self, projections: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        super().__init__()
        self.weights = _parameters([w for w, _ in projections])
        self.biased = all(b is not None for _, b in projections)
        self.biases = _parameters([b for _, b in projections if b is not None] if self.biased else [])
        self.one_row_kernel = gemv.available(projections[0][0])

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        bias = self.biases[layer] if self.biased else None
        if self.one_row_kernel and x.shape[0] == 1:  # a graph's row count is static: decided while tracing
            return gemv.bf16_gemv(x, self.weights[layer], bias)
        return F.linear(x, self.weights[layer], bias)


def _parameters(tensors: list[torch.Tensor]) -> torch.nn.ParameterList:
    """The tensors as frozen parameters (sharing their storage), so freezing folds them in."""
    return torch.nn.ParameterList([torch.nn.Parameter(t, requires_grad=False) for t in tensors])


class _DecodeGraph(torch.nn.Module):
    """One decode step over every layer; the weights are attributes, so freezing folds them in."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        config, base = model.config, model.model
        shape = AttentionShape.of(config)
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.eps = config.rms_norm_eps
        self.embed = torch.nn.Parameter(base.embed_tokens.weight, requires_grad=False)
        self.final_norm = torch.nn.Parameter(base.norm.weight, requires_grad=False)
        layers = base.layers
        attns, mlps = [b.self_attn for b in layers], [b.mlp for b in layers]
        self.input_norms = _parameters([b.input_layernorm.weight for b in layers])
        self.post_norms = _parameters([b.post_attention_layernorm.weight for b in layers])
        self.qkv = _Linears([llama.fused_weights(a.q_proj, a.k_proj, a.v_proj) for a in attns])
        self.out = _Linears([(a.o_proj.weight, a.o_proj.bias) for a in attns])
        self.gate_up = _Linears([llama.fused_weights(m.gate_proj, m.up_proj) for m in mlps])
        self.down = _Linears([(m.down_proj.weight, m.down_proj.bias) for m in mlps])

    def forward(
        self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
        tables: torch.Tensor, mask: torch.Tensor, pools: list[torch.Tensor],
    ) -> torch.Tensor:
        """input_ids [spans, count] -> hidden states after the final norm, [spans * count, hidden]; cos/sin
        [spans * count, 1, head_dim]; `mask` as `AttentionGroup.mask` lays it out."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        spans, count = input_ids.shape
        tokens = spans * count
        x = F.embedding(input_ids.view(-1), self.embed)
        for i, pool in enumerate(pools):
            qkv = self.qkv(i, F.rms_norm(x, (x.shape[-1],), self.input_norms[i], self.eps))
            q = _rope(qkv[:, : h * d].view(tokens, h, d), cos, sin)
            k = _rope(qkv[:, h * d : (h + kv) * d].view(tokens, kv, d), cos, sin)
            v = qkv[:, (h + kv) * d :].view(tokens, kv, d)
            pool.view(-1, 2, kv, d).index_copy_(0, slots, torch.stack((k, v), dim=1))
            both = pool.index_select(0, tables.view(-1)).view(spans, -1, 2, kv, d)
            # a key/value head's queries (its group, times the span's tokens) as one axis, as `attend` does
            q = q.view(spans, count, kv, h // kv, d).permute(0, 2, 3, 1, 4).reshape(spans, kv, -1, d)
            a = F.scaled_dot_product_attention(
                q, both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2), attn_mask=mask, scale=d**-0.5)
            a = a.view(spans, kv, h // kv, count, d).permute(0, 3, 1, 2, 4).reshape(tokens, -1)
            x = x + self.out(i, a)
            gate, up = self.gate_up(i, F.rms_norm(x, (x.shape[-1],), self.post_norms[i], self.eps)).chunk(2, -1)
            x = x + self.down(i, F.silu(gate) * up)
        return F.rms_norm(x, (x.shape[-1],), self.final_norm, self.eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def unsupported_reason(config: Any, dtype: torch.dtype, forward: str) -> str | None:
    """Why the compiled step cannot serve this model (None: it can), in words that follow "compile_decode";
    `forward` as `ModelRunner` takes it."""
    if forward == "transformers":
        return "needs our Llama-family forward, and transformers' was asked for"
    if (reason := llama.unsupported_reason(config)) or dtype == torch.float32:
        return ("needs our Llama-family forward (Llama, Mistral, Qwen2, SmolLM) in bf16 or fp16 (fp32 stays eager: "
                f"it equals transformers bit for bit){'; here: ' + reason if reason else ''}")
    compilers = [c for c in inductor_config.cpp.cxx if c]
    if not any(shutil.which(c) for c in compilers):
        return f"needs a C++ compiler for torch.compile's CPU kernels ({' or '.join(compilers)}, set by $CXX)"
    return None


class CompiledDecode:
    """The compiled step, and which batches it takes. Compiled at start-up (`warm_up`) for one row, (with
    `several_rows`) for any other row count, and (with `drafts`) for one span of several tokens, each for
    any block-table width, so no request waits for a compile."""

    def __init__(self, model: Any, rotary: Any, *, several_rows: bool = True, drafts: bool = False) -> None:
        """`several_rows`: also compile steps of several decode rows (else only a lone row's); `drafts`: also
        compile a lone sequence's verification of prompt lookup's drafts (a span of 2-65 tokens), which at one
        stream would otherwise cost an eager step for every compiled one it saves."""
        self.rotary = rotary
        self.several_rows = several_rows
        self.drafts = drafts
        self._graph = _DecodeGraph(model).eval()
        # the sizes that vary are marked on every call; the rest (the pools above all) stay static
        self._compiled = torch.compile(self._graph, dynamic=False, fullgraph=True)
        self.steps: Counter[str] = Counter()  # steps served (not warm-ups): "rows" (decode rows) or "span"

    def takes(self, batch: ForwardBatch) -> bool:
        """One attention group over at least two blocks, of one decode row (or, with `several_rows`, any
        number) or (with `drafts`) of one span of up to GROUPED_MAX_TOKENS tokens; anything else stays eager
        (a size of 1 would compile a graph of its own, and several drafting spans at once are rare enough not
        to be worth one)."""
        if len(batch.groups) != 1 or batch.groups[0].tables.shape[1] < 2:
            return False
        spans, count = batch.groups[0].tables.shape[0], batch.groups[0].count
        if count == 1:
            return spans == 1 or self.several_rows
        return self.drafts and spans == 1 and count <= GROUPED_MAX_TOKENS

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        self.steps["span" if batch.groups[0].count > 1 else "rows"] += 1
        return self._run(batch, cache)

    def _run(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        group = batch.groups[0]
        spans, count = group.tables.shape[0], group.count
        tokens = spans * count
        cos, sin = self.rotary(cache.pools[0], batch.positions.view(1, -1))
        ids, cos, sin = batch.input_ids.view(spans, count), cos.view(tokens, 1, -1), sin.view(tokens, 1, -1)
        torch._dynamo.mark_dynamic(group.tables, 1)
        torch._dynamo.mark_dynamic(group.mask, 3)
        if spans > 1:
            for tensor in (ids, cos, sin, batch.slots, group.tables, group.mask):
                torch._dynamo.mark_dynamic(tensor, 0)
        if count > 1:
            for tensor, dim in ((ids, 1), (cos, 0), (sin, 0), (batch.slots, 0), (group.mask, 2)):
                torch._dynamo.mark_dynamic(tensor, dim)
        with inductor_config.patch(_INDUCTOR_OPTIONS):
            return self._compiled(ids, cos, sin, batch.slots, group.tables, group.mask, cache.pools)

    def warm_up(self, cache: PagedKVCache, blocks: list[int], group: int) -> None:
        """Compile each graph by running a step into `blocks` of the cache (the caller clears them
        afterwards; rows may share them when few).

        Sizes of 0 and 1 are compiled as constants, and equal dynamic sizes are assumed to stay equal, so
        the rows, span length and block-table width used here differ from each other."""
        shapes = [(1, 1, "one row")]
        if self.several_rows:
            shapes.append((_WARM_UP_ROWS, 1, "several rows"))
        if self.drafts:
            shapes.append((1, _WARM_UP_SPAN, "a drafting row"))
        for rows, count, what in shapes:
            spans = [Span(r * count, count, (_WARM_UP_WIDTH - 1) * cache.block_size,
                          [blocks[(r * _WARM_UP_WIDTH + j) % len(blocks)] for j in range(_WARM_UP_WIDTH)])
                     for r in range(rows)]
            batch = ForwardBatch.build(spans, [[0] * count] * rows, block_size=cache.block_size, group=group,
                                       dtype=cache.pools[0].dtype, device=cache.device)
            started = time.monotonic()
            self._run(batch, cache)
            log.info("compiled the step for %s in %.1f s", what, time.monotonic() - started)
