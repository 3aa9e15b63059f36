"""StreamingLLM attention sinks on the paged cache: keep a sequence's first `sinks` tokens and its most
recent ones, so generation and sessions run forever in a constant-size cache.

Keys are stored after RoPE at their cache position (what attention reads needs no re-rotation per step).
When a token arrives and the cache is full (`capacity` entries), the oldest `evict_tokens` non-sink
entries go at once, a whole number of blocks, and the survivors' keys are re-rotated back by as many
positions, so positions stay contiguous within the cache (the paper's rule; queries take the next cache
position). Evicting in blocks keeps the bookkeeping to dropping block ids from the table, amortizes the
re-rotation over many tokens, and keeps bf16 keys from the drift of per-token re-rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_endpoint.backends.torch_engine.block_cache import BlockAllocator, PagedKVCache, slot_mapping

MAX_EVICT_TOKENS = 64
# RoPE variants whose frequencies depend on the sequence length cannot be shifted by a fixed rotation.
_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


@dataclass(frozen=True)
class SinkWindow:
    sinks: int
    window: int
    block_size: int

    def __post_init__(self) -> None:
        if self.window < 2 * self.block_size:
            raise ValueError(f"option.attention_window={self.window} is too small: expected at least "
                             f"{2 * self.block_size} tokens (two KV blocks)")

    @property
    def capacity(self) -> int:
        """Cache entries a sequence holds at most."""
        return self.sinks + self.window

    @property
    def evict_tokens(self) -> int:
        """Entries evicted at once: whole blocks, at most half the window (so the window keeps its recent
        half) and at most MAX_EVICT_TOKENS (so at least window - 64 recent tokens are always visible)."""
        half = self.window // 2 // self.block_size * self.block_size
        return max(self.block_size, min(MAX_EVICT_TOKENS, half))


def check_fits(sinks: int, window: int, max_model_len: int) -> None:
    """A sink cache must fit the model's positions: cache positions are what RoPE rotates by."""
    if sinks + window > max_model_len:
        raise ValueError(f"option.attention_sinks + option.attention_window = {sinks + window} exceeds the "
                         f"model's {max_model_len} positions: lower option.attention_window")


def rope_unsupported_reason(config: Any) -> str | None:
    """Why a checkpoint's RoPE cannot be shifted by re-rotation (None when it can)."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"its RoPE ({rope_type}) depends on the sequence length, so cached keys cannot be re-rotated"
    return None


class Rerotation:
    """Rotate stored (post-RoPE) keys back by `delta` positions: RoPE is a rotation per frequency pair, so
    rope(k, p) rotated by -delta is rope(k, p - delta). Uses the checkpoint's own frequencies (theta and
    scaling) and leaves out its attention scaling factor, which the stored keys already carry once."""

    def __init__(self, rotary: Any) -> None:
        self.inv_freq = rotary.inv_freq.detach().to(torch.float64)

    def __call__(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """keys [..., head_dim] -> the same keys at positions `delta` lower, in the keys' dtype."""
        angles = (-float(delta)) * self.inv_freq  # in fp64: exact enough for any shift
        angles = torch.cat((angles, angles))
        compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
        cos = angles.cos().to(device=keys.device, dtype=compute)
        sin = angles.sin().to(device=keys.device, dtype=compute)
        x = keys.to(compute)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).to(keys.dtype)


def evict(cache: PagedKVCache, allocator: BlockAllocator, table: list[int], *, sinks: int, cache_len: int,
          count: int, rerotate: Rerotation) -> int:
    """Drop cache entries [sinks, sinks + count) of the sequence with block table `table` (modified in place),
    `count` a multiple of the block size; returns the new cache length.

    Survivors keep their offset within a block (count is whole blocks), so only the last `sinks % block`
    sink entries move: into the block that becomes their block, over entries that are evicted anyway."""
    block = allocator.block_size
    if count % block or not 0 < count <= cache_len - sinks:
        raise ValueError(f"cannot evict {count} of {cache_len - sinks} non-sink entries in blocks of {block}")
    first, partial = divmod(sinks, block)
    dropped = count // block
    if partial:
        source, target = table[first], table[first + dropped]
        for pool in cache.pools:  # keys and values
            pool[target, :partial] = pool[source, :partial]
    allocator.drop(table, first, dropped)
    new_len = cache_len - count
    if new_len > sinks:
        slots = torch.tensor(slot_mapping(table, sinks, new_len - sinks, block), dtype=torch.long,
                             device=cache.device)
        for layer in range(len(cache.pools)):
            keys = cache.keys(layer)
            keys.index_copy_(0, slots, rerotate(keys.index_select(0, slots), count))
    return new_len
