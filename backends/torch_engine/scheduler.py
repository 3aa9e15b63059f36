"""Which sequences run in the next step, and how many of their tokens: queues, admission, KV blocks.

Admission is by free KV blocks, not by a slot count alone: a request is admitted when its prompt's blocks
are free (keeping one block per running sequence in reserve so they can grow), otherwise it waits. When a
running sequence needs a block and none is free, the youngest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue with its tokens, to be recomputed when it fits again.
Nothing admitted is lost and the process never allocates past the pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llm_endpoint.backends.torch_engine.block_cache import BlockAllocator
from llm_endpoint.backends.torch_engine.sequence import Sequence, Status


@dataclass(frozen=True)
class Chunk:
    """Feed `seq.tokens[start:start+count]` this step, at cache positions from `seq.cache_len`."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the sequence's last token, so the step draws its next one."""
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, max_running: int, prefill_tokens: int) -> None:
        self.allocator = allocator
        self.max_running = max_running
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it and free its blocks (finished, failed or aborted)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
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
                take = min(seq.pending, budget)
                prefill.append(Chunk(seq, seq.computed, take))
                budget -= take
        return decode + prefill

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            need = self.allocator.missing(seq.block_table, seq.cache_len + seq.pending)
            if need > self.allocator.free_blocks - len(self.running):
                return  # waits for blocks; FIFO, so a long prompt is not starved by short ones behind it
            self.waiting.popleft()
            self.allocator.grow(seq.block_table, seq.cache_len + seq.pending)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _grow_decoding(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.pending != 1:
                continue
            while self.allocator.missing(seq.block_table, seq.cache_len + 1) > self.allocator.free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.allocator.grow(seq.block_table, seq.cache_len + 1)
                chunks.append(Chunk(seq, seq.computed, 1))
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.reset_cache()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
