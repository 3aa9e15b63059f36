"""Our own forward for Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM): packed tokens through
the layers with fused projections and no per-call framework overhead; attention reads the paged cache.

It reuses the checkpoint's own weights (no copy beyond concatenating q/k/v and gate/up) and transformers'
rotary embedding module, so every RoPE variant transformers supports for these models is the same here.
The arithmetic follows transformers' modeling_llama op for op, which keeps greedy output equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llm_endpoint.backends.torch_engine.attention import attend
from llm_endpoint.backends.torch_engine.block_cache import PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch

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


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
    if any(p is None for p in parts):
        return None
    return torch.cat([p for p in parts if p is not None]).contiguous()


class LlamaForward:
    def __init__(self, model: Any) -> None:
        config = model.config
        base = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        self.rotary = base.rotary_emb
        self.layers: list[_Layer] = []
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append(_Layer(
                input_norm=block.input_layernorm.weight,
                qkv=_cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),  # type: ignore[arg-type]
                qkv_bias=_cat(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias),
                out=attn.o_proj.weight,
                out_bias=attn.o_proj.bias,
                post_norm=block.post_attention_layernorm.weight,
                gate_up=_cat(mlp.gate_proj.weight, mlp.up_proj.weight),  # type: ignore[arg-type]
                gate_up_bias=_cat(mlp.gate_proj.bias, mlp.up_proj.bias),
                down=mlp.down_proj.weight,
                down_bias=mlp.down_proj.bias,
            ))
        self._split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        x = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.rotary(x, batch.positions.view(1, -1))
        cos, sin = cos.view(-1, 1, self.head_dim), sin.view(-1, 1, self.head_dim)
        t = x.shape[0]
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.input_norm)
            q, k, v = F.linear(h, layer.qkv, layer.qkv_bias).split(self._split, dim=-1)
            q = _rope(q.view(t, self.heads, self.head_dim), cos, sin)
            k = _rope(k.view(t, self.kv_heads, self.head_dim), cos, sin)
            cache.write(i, batch.slots, k, v.reshape(t, self.kv_heads, self.head_dim))
            a = attend(cache, batch, i, q, self.scale)
            x = x + F.linear(a.view(t, -1), layer.out, layer.out_bias)
            h = self._rms(x, layer.post_norm)
            gate, up = F.linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down, layer.down_bias)
        return self._rms(x, self.norm)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
