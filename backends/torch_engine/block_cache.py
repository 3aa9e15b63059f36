"""Block-paged KV storage: memory follows the tokens held, not the longest row times every slot.

Every layer's keys and values live in one pool of fixed-size blocks; a sequence owns a block table (the
list of its blocks, in order) and its token at cache position p sits in block `table[p // block_size]`,
offset `p % block_size`. The pool is allocated untouched (`torch.empty`), and freed blocks are reused
last-freed-first, so resident memory grows with the tokens actually written.

A table is plain data, owned by the sequence, so it can outlive a request (sessions), lose a span of
blocks (attention sinks: `drop`) and be cut back after speculative writes (prompt lookup: `truncate`).
Keys are stored after RoPE at their cache position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class AttentionShape:
    """A checkpoint's attention heads; transformers configs may leave out `num_key_value_heads` (no GQA)
    and `head_dim` (hidden_size / heads)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> AttentionShape:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def block_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Keys and values of `block_size` tokens over every layer."""
        return block_size * 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` cache positions."""
    return -(-tokens // block_size)


class OutOfBlocks(Exception):
    """The pool cannot hold what was asked; the scheduler waits or preempts, never the process."""


class BlockAllocator:
    """The free list. Not thread-safe: only the engine thread touches it."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._granted: list[int] = []  # handed out since the last `take_granted`, for the cache to clear

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def missing(self, table: list[int], tokens: int) -> int:
        """Blocks `table` still needs to hold `tokens` cache positions."""
        return max(0, self.blocks_for(tokens) - len(table))

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend `table` in place to cover `tokens` positions; all or nothing."""
        need = self.missing(table, tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"{need} KV blocks needed, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.pop())
            self._granted.append(table[-1])

    def take_granted(self) -> list[int]:
        """Blocks handed out since the last call. They hold whatever their last owner left (possibly NaN
        from a failed request, or never-written memory); attention weighs unwritten positions by zero, and
        0 * NaN is NaN, so they must be cleared before use."""
        granted, self._granted = self._granted, []
        return granted

    def truncate(self, table: list[int], tokens: int) -> None:
        """Free the blocks past the first `tokens` positions (rolling back rejected draft tokens)."""
        keep = self.blocks_for(tokens)
        while len(table) > keep:
            self._free.append(table.pop())

    def drop(self, table: list[int], first: int, count: int) -> None:
        """Free blocks `table[first:first+count]` and close the gap (evicting a span of old tokens)."""
        self._free.extend(reversed(table[first : first + count]))
        del table[first : first + count]

    def free(self, table: list[int]) -> None:
        self.truncate(table, 0)


class PagedKVCache:
    """The per-layer pools, layout [blocks, block_size, 2, kv_heads, head_dim]: a token's key and value side
    by side, so one call writes both and one gather of whole blocks (a contiguous copy per block) reads
    both; keys and values then read as [rows, kv_heads, length, head_dim] through strided views, which SDPA
    takes as they are. Each operator call costs ~10 us inside a decode step (the weights streaming through
    the caches evict its code and data), so halving the calls here is worth more than the bytes."""

    def __init__(
        self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = device
        shape = (num_blocks, block_size, 2, num_kv_heads, head_dim)
        self.pools = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # the same memory by flat slot (block * block_size + offset), made once rather than every step
        self._by_slot = [pool.view(-1, 2, num_kv_heads, head_dim) for pool in self.pools]

    def clear(self, blocks: list[int]) -> None:
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for pool in self.pools:
            pool.index_fill_(0, index, 0)

    def keys(self, layer: int) -> torch.Tensor:
        """The layer's keys by flat slot (block * block_size + offset), [slots, kv_heads, head_dim], a view."""
        return self._by_slot[layer][:, 0]

    def write(self, layer: int, slots: torch.Tensor, keys_and_values: torch.Tensor) -> None:
        """Store `keys_and_values` [tokens, 2, kv_heads, head_dim] (key then value) at flat slots."""
        self._by_slot[layer].index_copy_(0, slots, keys_and_values)

    def gather(
        self, layer: int, tables: torch.Tensor, run_start: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows whose block tables are `tables` [rows, blocks] (padded with any valid
        block id; the caller masks positions past each row's length), as [rows, kv_heads, length, head_dim].
        `run_start`: the tables are one row of consecutive blocks from this one, read in place (no copy)."""
        rows, blocks = tables.shape
        if run_start is not None:
            both = self.pools[layer][run_start : run_start + blocks]
        else:
            # index_select copies whole blocks; `pool[tables]` goes element by element, 3.5x slower at 16 rows
            both = self.pools[layer].index_select(0, tables.view(-1))
        both = both.view(rows, blocks * self.block_size, 2, self.num_kv_heads, self.head_dim)
        return both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)


def slot_mapping(table: list[int], start: int, count: int, block_size: int) -> list[int]:
    """Flat slots of cache positions start..start+count-1 of a sequence with block table `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, start + count)]
