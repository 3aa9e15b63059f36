"""The fallback forward for architectures our own forward does not cover: transformers' model, run on the
packed step as one row, with a Cache adapter that writes into the paged cache and our paged attention."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from llm_endpoint.backends.torch_engine import attention
from llm_endpoint.backends.torch_engine.block_cache import PagedKVCache
from llm_endpoint.backends.torch_engine.forward_batch import ForwardBatch


class _PagedWrites(Cache):
    """transformers hands each layer's new keys/values here; they go to the step's cache slots."""

    def __init__(self, cache: PagedKVCache, batch: ForwardBatch) -> None:
        super().__init__(layers=[])
        self._cache = cache
        self._batch = batch

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [1, kv_heads, tokens, dim] twice -> [tokens, 2, kv_heads, dim]
        both = torch.stack((key_states[0], value_states[0]), dim=1).transpose(0, 2)
        self._cache.write(layer_idx, self._batch.slots, both)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


# A prepared 4D mask makes transformers skip building its own; the paged attention masks by itself.
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


class TransformersForward:
    def __init__(self, model: Any) -> None:
        if model.config._attn_implementation != attention.NAME:
            model.set_attn_implementation(attention.NAME)
        self._decoder = model.base_model

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        attention.CURRENT.cache, attention.CURRENT.batch = cache, batch
        try:
            out = self._decoder(
                input_ids=batch.input_ids.view(1, -1),
                position_ids=batch.positions.view(1, -1),
                attention_mask=_NO_MASK,
                past_key_values=_PagedWrites(cache, batch),
                use_cache=True,
            )
        finally:
            attention.CURRENT.cache = attention.CURRENT.batch = None
        return out.last_hidden_state[0]
