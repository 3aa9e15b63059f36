"""Grouped-query attention that reads the slot cache in place.

With an explicit mask (which continuous batching needs), transformers' SDPA path expands every key/value
head to all its query heads (`repeat_kv`): a full copy of each running row's cache, per layer, per step.
Folding the query heads of a group into the query-length axis instead lets one key/value head serve its
whole group with no copy. Registered through transformers' public AttentionInterface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "llm_endpoint_grouped_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [n, heads, q, d]; key/value [n, kv_heads, L, d]; mask bool [n, 1, q, L] -> [n, q, heads, d]."""
    n, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    # Query head j*group+i uses key/value head j (as repeat_kv lays them out).
    folded = query.reshape(n, kv_heads, group * q_len, dim)
    mask = attention_mask
    if mask is None and q_len > 1:  # no mask means causal (transformers' own generate); the last q_len
        # keys are the new tokens, and folding would break SDPA's is_causal, so spell the mask out.
        positions = torch.arange(kv_len - q_len, kv_len, device=query.device)
        mask = (torch.arange(kv_len, device=query.device).view(1, kv_len) <= positions.view(q_len, 1))
        mask = mask.view(1, 1, q_len, kv_len).expand(n, 1, q_len, kv_len)
    if mask is not None:
        mask = mask[:, :, :, :kv_len]
        if group > 1:
            mask = mask.unsqueeze(2).expand(n, mask.shape[1], group, q_len, kv_len)
            mask = mask.reshape(n, -1, group * q_len, kv_len)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(n, heads, q_len, dim).transpose(1, 2), None


AttentionInterface.register(NAME, grouped_sdpa)
