"""KV caches that stateful sessions keep between turns, in the same block pool as running requests.

A finished turn leaves its blocks here instead of freeing them; the session's next request reuses the
longest prefix its tokens share with what was computed (usually everything: the server sends the whole
history, previous replies included) and prefills only the rest. Idle caches are bounded by `max_blocks`
and give way, least recently used first, whenever running requests need blocks: a session whose cache
was dropped recomputes its history on its next turn, slower but never wrong.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from llm_endpoint.backends.torch_engine.block_cache import BlockAllocator
from llm_endpoint.backends.torch_engine.sequence import Sequence


@dataclass
class Retained:
    tokens: list[int]  # the tokens fed through the model, in order (a sink cache holds only some of them)
    table: list[int]
    cache_len: int

    @property
    def evicted(self) -> int:
        return len(self.tokens) - self.cache_len


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionCache:
    """Engine-thread only, like the allocator."""

    def __init__(self, allocator: BlockAllocator, *, max_blocks: int, sinks: int = 0) -> None:
        self.allocator = allocator
        self.max_blocks = max_blocks
        self.sinks = sinks
        self._idle: OrderedDict[str, Retained] = OrderedDict()  # least recently used first
        self.held_blocks = 0

    def resume(self, seq: Sequence) -> None:
        """Hand `seq` its session's cache, cut back to what its tokens share with it (`seq.cached_prompt`
        says how much). At least the last prompt token is always computed again (the step samples from it)."""
        session = seq.request.session_id
        kept = self._idle.pop(session, None) if session else None
        if kept is None:
            return
        self.held_blocks -= len(kept.table)
        reuse = min(common_prefix(kept.tokens, seq.tokens), len(seq.tokens) - 1)
        # A sink cache lost the entries between its sinks and its recent window: only a cut inside the recent
        # window leaves a cache that matches the tokens. A prompt-logprob request recomputes every position.
        if (kept.evicted and reuse < self.sinks + kept.evicted) or seq.request.params.prompt_logprobs:
            reuse = 0
        cache_len = reuse - kept.evicted if reuse else 0
        self.allocator.truncate(kept.table, cache_len)
        seq.block_table, seq.computed, seq.cache_len = kept.table, reuse, cache_len
        seq.cached_prompt = reuse

    def keep(self, seq: Sequence) -> bool:
        """Keep a finished (or aborted) turn's cache for its session; False when `seq` has none to keep."""
        session = seq.request.session_id
        if not session or not seq.block_table or seq.computed == 0:
            return False
        self.close(session)
        table = list(seq.block_table)
        seq.block_table.clear()
        self._idle[session] = Retained(seq.tokens[: seq.computed], table, seq.cache_len)
        self.held_blocks += len(table)
        while self.held_blocks > self.max_blocks and self._idle:
            self._drop_oldest()
        return True

    def close(self, session: str) -> None:
        kept = self._idle.pop(session, None)
        if kept is not None:
            self.held_blocks -= len(kept.table)
            self.allocator.free(kept.table)

    def reclaim(self, free_wanted: int) -> bool:
        """Drop idle caches, oldest first, until `free_wanted` blocks are free; False if they cannot be."""
        while self.allocator.free_blocks < free_wanted and self._idle:
            self._drop_oldest()
        return self.allocator.free_blocks >= free_wanted

    def _drop_oldest(self) -> None:
        self.close(next(iter(self._idle)))
