"""Batched KV storage with one row ("slot") per live sequence, each row at its own length.

transformers' caches assume every row of a batch sits at the same position; continuous batching needs
rows at different positions, so this cache writes each new key/value at the row's own position and
returns keys up to the longest row; the engine masks the rest with a 4D attention mask.

Every row is allocated at the longest row's capacity (memory = slots x longest row); `copy_row` and
`swap_rows` move whole rows between slots. Keys are stored post-RoPE, and one step may write several query
tokens per row. Nothing yet drops a span of a row or moves a row out of the cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

_BLOCK = 128  # capacity grows in whole blocks to amortize reallocation


class SlotKVCache(Cache):
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
    ) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.max_len = max_len
        self._shape = (num_slots, num_kv_heads, 0, head_dim)
        self._dtype = dtype
        self._device = device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._ensure_capacity(_BLOCK)
        # Set by `bind()` before each forward pass.
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._write_rows = torch.empty(0, dtype=torch.long)
        self._write_pos = torch.empty(0, dtype=torch.long)
        self._kv_len = 0

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = min(max(needed, 2 * self.capacity, _BLOCK), self.max_len + _BLOCK)
        new_cap = -(-new_cap // _BLOCK) * _BLOCK
        s, h, _, d = self._shape
        for store in (self.keys, self.values):
            for i in range(self.num_layers):
                fresh = torch.zeros((s, h, new_cap, d), dtype=self._dtype, device=self._device)
                if store and self.capacity:
                    fresh[:, :, : self.capacity] = store[i]
                if len(store) > i:
                    store[i] = fresh
                else:
                    store.append(fresh)
        self.capacity = new_cap

    def release_memory(self) -> None:
        """Shrink back to one block (called when the engine goes idle)."""
        if self.capacity > _BLOCK:
            self.capacity = 0
            self.keys, self.values = [], []
            self._ensure_capacity(_BLOCK)

    def bind(self, rows: slice | torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """Prepare the next forward: `rows` are the slots in batch order, `positions[i, j]` is where query
        token j of row i is written, `kv_len` how many cached positions attention reads."""
        self._ensure_capacity(kv_len)
        self._rows = rows
        n, q = positions.shape
        row_ids = torch.arange(self.num_slots)[rows] if isinstance(rows, slice) else rows
        self._write_rows = row_ids.view(n, 1).expand(n, q)
        self._write_pos = positions
        self._kv_len = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # key_states: [n, heads, q, dim] -> indexed assignment wants [n, q, heads, dim]
        keys[self._write_rows, :, self._write_pos] = key_states.transpose(1, 2)
        values[self._write_rows, :, self._write_pos] = value_states.transpose(1, 2)
        return keys[self._rows, :, : self._kv_len], values[self._rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def copy_row(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for layer in store:
                layer[dst, :, :length] = layer[src, :, :length]

    def swap_rows(self, a: int, b: int, len_a: int, len_b: int) -> None:
        n = max(len_a, len_b)
        for store in (self.keys, self.values):
            for layer in store:
                tmp = layer[a, :, :n].clone()
                layer[a, :, :n] = layer[b, :, :n]
                layer[b, :, :n] = tmp
