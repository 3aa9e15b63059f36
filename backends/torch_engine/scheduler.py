"""Which sequences run in the next step, and how many of their tokens: queues, admission, KV blocks.

Admission is by free KV blocks, not by a slot count alone: a request is admitted when its prompt's blocks
are free (keeping one block per running sequence in reserve so they can grow), otherwise it waits. When a
running sequence needs a block and none is free, the youngest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue with its tokens, to be recomputed when it fits again.
Nothing admitted is lost and the process never allocates past the pool. Idle sessions' caches give way
before anything running is preempted.

With attention sinks a sequence never holds more than the sink cache's capacity: chunks are cut so the
cache fills exactly, and a full cache evicts (through `evict`) before its next token, so a long prompt is
prefilled in pieces with eviction between them and the result does not depend on how it was chunked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from llm_endpoint.backends.torch_engine.block_cache import BlockAllocator
from llm_endpoint.backends.torch_engine.prompt_lookup import DRAFT_STEP_COST_TOKENS
from llm_endpoint.backends.torch_engine.sequence import Sequence, Status
from llm_endpoint.backends.torch_engine.session_cache import SessionCache


@dataclass(frozen=True)
class Chunk:
    """Feed `seq.tokens[start:start+count]` this step, then `draft` (prompt lookup's guesses at the tokens
    that follow), at cache positions from `seq.cache_len`; `count` includes the draft."""

    seq: Sequence
    start: int
    count: int
    draft: tuple[int, ...] = ()

    @property
    def fed(self) -> int:
        """Tokens of the sequence itself in the chunk."""
        return self.count - len(self.draft)

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the sequence's last token, so the step draws its next one(s)."""
        return self.start + self.fed == len(self.seq.tokens)


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, *, max_running: int, prefill_tokens: int,
        sessions: SessionCache | None = None, cache_limit: int | None = None,
        evict: Callable[[Sequence], None] | None = None,
    ) -> None:
        """`sessions`: where finished session turns keep their cache (None: nowhere); `cache_limit`: the sink
        cache's capacity (None: no limit); `evict(seq)` frees room in a full one."""
        if (cache_limit is None) != (evict is None):
            raise ValueError("a cache limit needs an eviction, and an eviction a limit")
        self.allocator = allocator
        self.max_running = max_running
        self.prefill_tokens = prefill_tokens
        self.sessions = sessions if sessions is not None else SessionCache(allocator, max_blocks=0)
        self.cache_limit = cache_limit
        self._evict = evict
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence, *, keep: bool = False) -> None:
        """Take `seq` out of whichever queue holds it; its blocks go to its session with `keep` (a turn that
        finished or was aborted: its cache is sound), else back to the pool (failed)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if not (keep and self.sessions.keep(seq)):
            self.allocator.free(seq.block_table)
        seq.status = Status.FINISHED

    def schedule(self) -> list[Chunk]:
        """The next step's chunks: every decoding sequence's one token, then prefill chunks within budget."""
        self._admit()
        decode = self._grow_decoding()
        budget = self.prefill_tokens
        prefill: list[Chunk] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.pending > 1:
                self._make_room(seq)
                take = min(seq.pending, budget, self._room(seq))
                if self.allocator.missing(seq.block_table, seq.cache_len + take) > self.allocator.free_blocks:
                    continue  # the blocks an eviction just freed went elsewhere: next step
                self.allocator.grow(seq.block_table, seq.cache_len + take)
                prefill.append(Chunk(seq, seq.computed, take))
                budget -= take
        return decode + prefill

    def _room(self, seq: Sequence) -> int:
        """Tokens `seq` may add to its cache before it is full."""
        return seq.pending if self.cache_limit is None else self.cache_limit - seq.cache_len

    def _make_room(self, seq: Sequence) -> None:
        if self._evict is not None and self._room(seq) <= 0:
            self._evict(seq)

    def _target(self, seq: Sequence) -> int:
        """Cache entries `seq` needs for everything pending, as far as its cache may hold them."""
        return seq.cache_len + min(seq.pending, max(self._room(seq), 1))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.cache_len == 0 and not seq.block_table:
                self.sessions.resume(seq)
            need = self.allocator.missing(seq.block_table, self._target(seq))
            wanted = need + len(self.running)
            if wanted > self.allocator.free_blocks and not self.sessions.reclaim(wanted):
                return  # waits for blocks; FIFO, so a long prompt is not starved by short ones behind it
            self.waiting.popleft()
            self.allocator.grow(seq.block_table, self._target(seq))
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _grow_decoding(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.pending != 1:
                continue
            self._make_room(seq)
            while self.allocator.missing(seq.block_table, seq.cache_len + 1) > self.allocator.free_blocks:
                if self.sessions.reclaim(self.allocator.missing(seq.block_table, seq.cache_len + 1)):
                    break
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                draft = self._draft(seq)
                self.allocator.grow(seq.block_table, seq.cache_len + 1 + len(draft))
                chunks.append(Chunk(seq, seq.computed, 1 + len(draft), draft))
        return self._drafts_that_pay(chunks)

    def _drafts_that_pay(self, chunks: list[Chunk]) -> list[Chunk]:
        """Beside other rows, the step's verifications cost attention calls of their own however few there
        are: unless together they are expected to add DRAFT_STEP_COST_TOKENS, the step drafts nothing and
        each draft is scored in the shadow instead."""
        drafting = [chunk for chunk in chunks if chunk.draft]
        if len(self.running) <= 1 or not drafting:
            return chunks
        if sum(chunk.seq.draft_odds.expected(len(chunk.draft)) for chunk in drafting) >= DRAFT_STEP_COST_TOKENS:
            return chunks
        for chunk in drafting:
            chunk.seq.draft_odds.shadow = chunk.draft[0]
            self.allocator.truncate(chunk.seq.block_table, chunk.seq.cache_len + 1)
        return [Chunk(chunk.seq, chunk.start, 1) if chunk.draft else chunk for chunk in chunks]

    def _draft(self, seq: Sequence) -> tuple[int, ...]:
        """Prompt lookup's draft for a decoding sequence: never more than the tokens it may still generate
        (the verified pass adds one of its own), than its sink cache holds, than free blocks allow, or than
        pays at this batch size given how often its drafts have held (`DraftOdds`; open-ended text at 16
        streams lost 30% with unconditional drafts). A sequence that does not draft proposes in the shadow,
        to be scored against the token it gets."""
        if seq.proposer is None:
            return ()
        params = seq.request.params
        limit = min(params.prompt_lookup_num_tokens, params.max_new_tokens - seq.num_output - 1)
        if self.cache_limit is not None:
            limit = min(limit, self.cache_limit - seq.cache_len - 1)
        if limit <= 0:
            return ()
        worth = seq.draft_odds.length(limit, len(self.running))
        draft = seq.proposer.propose(seq.tokens, max(worth, 1))
        if not worth:
            seq.draft_odds.shadow = draft[0] if draft else None
            return ()
        while draft and self.allocator.missing(seq.block_table, seq.cache_len + 1 + len(draft)) > self.allocator.free_blocks:
            draft = draft[:-1]
        return tuple(draft)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.reset_cache()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
