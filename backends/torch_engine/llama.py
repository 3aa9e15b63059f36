"""Our own forward for Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM): packed tokens through
the layers with fused projections and no per-call framework overhead; attention reads the paged cache.

It reuses the checkpoint's own weights (no copy beyond concatenating q/k/v and gate/up) and transformers'
rotary embedding module, so every RoPE variant transformers supports for these models is the same here.
In fp32 the arithmetic is transformers' modeling_llama bit for bit, which keeps greedy output equal to
it; in bf16 the norms round once instead of twice (closer to fp32 than transformers' bf16, tested).
Inside a decode step every operator call costs ~10 us, as the weights streaming through the caches evict
the code and data of the small ones, so the layer is written in as few calls as the arithmetic allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llm_endpoint.backends.torch_engine.attention import attend
from llm_endpoint.backends.torch_engine.block_cache import AttentionShape, PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch
from llm_endpoint.backends.torch_engine.linear import PackedLinear

_FAMILY = frozenset({"llama", "mistral", "qwen2"})


def unsupported_reason(config: Any) -> str | None:
    """Why our forward cannot run this checkpoint (None when it can)."""
    if config.model_type not in _FAMILY:
        return f"model_type {config.model_type!r} is not in the Llama family ({', '.join(sorted(_FAMILY))})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (expected silu)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    return None


class RmsNorm:
    """RMSNorm in the fewest operator calls the dtype allows.

    fp32 keeps `F.rms_norm`: transformers' LlamaRMSNorm bit for bit. On CPU that is a composite of ~10 small
    operators in bf16/fp16 (casts, pow, mean, rsqrt, two multiplies), ~75 us each of the 61 norms of a decode
    step once the weights have evicted them from the caches (~10% of a one-row step, measured). There a
    layer norm over [x, -x] is the same arithmetic in one native kernel: its mean is 0 and its variance is
    mean(x^2), so it returns x * rsqrt(mean(x^2) + eps), scaled by the first half of its weight [w, 0], in
    fp32 and rounded once, as `F.rms_norm` does.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps, self.width = weight, eps, weight.shape[-1]
        self._mirrored: torch.Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
            self._mirrored = torch.cat((weight, torch.zeros_like(weight)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, width] -> normalized and scaled; in half precision a strided view of [rows, 2 * width]."""
        if self._mirrored is None:
            return F.rms_norm(x, (self.width,), self.weight, eps=self.eps)
        both = F.layer_norm(torch.cat((x, x.neg()), dim=-1), (2 * self.width,), self._mirrored, None, self.eps)
        return both[:, : self.width]


@dataclass
class _Layer:
    input_norm: RmsNorm
    qkv: PackedLinear
    out: PackedLinear
    post_norm: RmsNorm
    gate_up: PackedLinear
    down: PackedLinear


def fused_weights(*linears: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections that read the same input (q/k/v, gate/up): one matmul
    instead of three."""
    biases = [lin.bias for lin in linears]
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    return torch.cat([lin.weight for lin in linears]).contiguous(), bias


def _fused(*linears: Any) -> PackedLinear:
    return PackedLinear(*fused_weights(*linears))


def _plain(linear: Any) -> PackedLinear:
    return PackedLinear(linear.weight, linear.bias)


class LlamaForward:
    def __init__(self, model: Any) -> None:
        config = model.config
        base = model.model
        shape = AttentionShape.of(config)
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.scale = self.head_dim**-0.5
        eps = config.rms_norm_eps
        self.embed = base.embed_tokens.weight
        self.norm = RmsNorm(base.norm.weight, eps)
        self.rotary = base.rotary_emb
        self.layers: list[_Layer] = []
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append(_Layer(
                input_norm=RmsNorm(block.input_layernorm.weight, eps),
                qkv=_fused(attn.q_proj, attn.k_proj, attn.v_proj),
                out=_plain(attn.o_proj),
                post_norm=RmsNorm(block.post_attention_layernorm.weight, eps),
                gate_up=_fused(mlp.gate_proj, mlp.up_proj),
                down=_plain(mlp.down_proj),
            ))
        # the fused projection's columns: queries, keys (rotated with them), values
        self._queries = self.heads * self.head_dim
        self._rotated = self._queries + self.kv_heads * self.head_dim
        self.packed = all(layer.qkv.packed for layer in self.layers)

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        x = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.rotary(x, batch.positions.view(1, -1))
        cos, sin = cos.view(-1, 1, self.head_dim), _signed(sin).view(-1, 1, self.head_dim)
        t = x.shape[0]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.input_norm(x))
            qk = qkv[:, : self._rotated].view(t, -1, self.head_dim)
            _rope_in_place(qk, cos, sin)  # q and k in one pass
            cache.write(i, batch.slots, qkv[:, self._queries :].view(t, 2, self.kv_heads, self.head_dim))
            a = attend(cache, batch, i, qk[:, : self.heads], self.scale)
            x = x + layer.out(a.reshape(t, -1))
            gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return self.norm(x)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, made once a step, so that `_rope_in_place` needs no negation."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope_in_place(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """x = transformers' `x * cos + rotate_half(x) * sin`, bit for bit: rotate_half(x) is cat(-x2, x1), and
    cat(x2, x1) * cat(-sin1, sin2) rounds the same products (negation is exact), in 4 operators, not 7.
    In place, so the rotated keys sit beside their values in the fused projection's output."""
    torch.add(x * cos, x.roll(x.shape[-1] // 2, dims=-1) * signed_sin, out=x)
