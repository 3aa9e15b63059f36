"""Attention over the paged KV cache for one packed step, shared by our Llama forward and the transformers
fallback (registered through transformers' public AttentionInterface).

Grouped-query heads are folded into the query axis, so one key/value head serves its whole group with no
`repeat_kv` copy; spans attend in the groups `ForwardBatch` made (same token count, similar length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from llm_endpoint.backends.torch_engine.block_cache import PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch

NAME = "llm_endpoint_paged"


def attend(cache: PagedKVCache, batch: ForwardBatch, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    """query [tokens, heads, dim] (this step's keys/values already written) -> [tokens, heads, dim]."""
    tokens, heads, dim = query.shape
    kv_heads = cache.num_kv_heads
    group = heads // kv_heads
    outs: list[torch.Tensor] = []
    for rows in batch.groups:
        keys, values = cache.gather(layer, rows.tables, rows.run_start)
        n, c = rows.tables.shape[0], rows.count
        q = query if len(batch.groups) == 1 else query[rows.start : rows.stop]
        if c == 1:  # decode rows: [n, heads, dim] already is [n, kv_heads, group, dim], no permutes
            q = q.view(n, kv_heads, group, dim)
        else:
            q = q.view(n, c, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, group * c, dim)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=rows.mask, scale=scale)
        if c > 1:
            o = o.view(n, kv_heads, group, c, dim).permute(0, 3, 1, 2, 4)
        outs.append(o.reshape(n * c, heads, dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)  # groups are in token order, back to back


class StepContext:
    """The cache and batch of the forward in progress, for the transformers fallback's attention calls."""

    cache: PagedKVCache | None = None
    batch: ForwardBatch | None = None


CURRENT = StepContext()


def _transformers_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim] -> [1, tokens, heads, dim]; keys/values were written by the cache."""
    cache, batch = CURRENT.cache, CURRENT.batch
    if cache is None or batch is None:
        raise RuntimeError(f"{NAME} attention runs only inside the engine's forward")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer: int = getattr(module, "layer_idx")  # noqa: B009  (a plain int on every transformers attention module)
    out = attend(cache, batch, layer, query[0].transpose(0, 1), scale)
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, _transformers_attention)
