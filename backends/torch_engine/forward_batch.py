"""One step's model input, laid out once per step and read by every layer: packed tokens, cache slots,
block tables and masks. Spans with the same number of tokens (decode rows, drafts to verify, short prompt
chunks) and similar lengths attend as one batched group; a long prefill chunk attends on its own. No row
is padded to another's length in the linear layers, and in attention only within its group: one 8k-token
row among short ones would otherwise make every row's gathered keys and values 8k long, in every layer,
every step; and each drafting row attending alone cost ~30 small operator calls a step, more than its
drafts saved beside 15 other rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_endpoint.backends.torch_engine.block_cache import blocks_for, slot_mapping


@dataclass(frozen=True)
class Span:
    """A run of packed tokens from one sequence, with what its attention reads."""

    offset: int  # into the packed token axis
    count: int
    start: int  # cache position of the first token
    table: list[int]

    @property
    def length(self) -> int:
        """Cache entries the span's last token sees."""
        return self.start + self.count


@dataclass
class AttentionGroup:
    """Spans of `count` tokens each, packed at tokens start..stop-1, attending as one batch."""

    start: int
    stop: int
    count: int
    tables: torch.Tensor  # [spans, blocks], padded with each span's own first block
    # additive (0 where attention may look, -inf elsewhere): [spans, 1, 1, positions] for single tokens;
    # otherwise [spans, 1, group*count, positions], rows repeating per query head of a key/value group, the
    # layout `attention.attend` folds queries into
    mask: torch.Tensor
    # a single span whose blocks are consecutive ids from this one: attention reads them in place. Freed
    # blocks go back last-freed-first, so one stream at a time usually gets such a run, and skips a copy
    # of its whole cache in every layer
    run_start: int | None = None


# A span joins the current group while it has the group's token count, at most GROUPED_MAX_TOKENS of them,
# and its block count is at most GROUP_RATIO times the group's first (shortest) span's, or within
# GROUP_SLACK_BLOCKS of it: padding costs at most ~2x a span's own reads.
GROUPED_MAX_TOKENS = 65  # a decode token and up to 64 drafts
GROUP_RATIO = 2
GROUP_SLACK_BLOCKS = 8


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens], cache positions (what RoPE rotates by)
    slots: torch.Tensor  # [tokens], flat cache slots the new keys/values go to
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls, spans: list[Span], tokens: list[list[int]], *, block_size: int, group: int, dtype: torch.dtype,
        device: torch.device,
    ) -> ForwardBatch:
        """`spans` with their `tokens`, ordered by token count and then length (so groups are runs of
        them); `group` query heads per key/value head. Masks are built once here in the attention's dtype,
        so no layer converts them again."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for span, toks in zip(spans, tokens):
            ids.extend(toks)
            positions.extend(range(span.start, span.start + span.count))
            slots.extend(slot_mapping(span.table, span.start, span.count, block_size))
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            groups=[_group(spans[a:b], block_size, group, dtype, device) for a, b in _runs(spans, block_size)],
        )


def _runs(spans: list[Span], block_size: int) -> list[tuple[int, int]]:
    """Ranges of `spans` that attend as one batch."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for i, span in enumerate(spans):
        if i == start:
            continue
        first = spans[start]
        blocks, first_blocks = blocks_for(span.length, block_size), blocks_for(first.length, block_size)
        if (span.count != first.count or span.count > GROUPED_MAX_TOKENS
                or blocks > max(GROUP_RATIO * first_blocks, first_blocks + GROUP_SLACK_BLOCKS)):
            ranges.append((start, i))
            start = i
    if spans:
        ranges.append((start, len(spans)))
    return ranges


def _group(rows: list[Span], block_size: int, group: int, dtype: torch.dtype, device: torch.device) -> AttentionGroup:
    count = rows[0].count
    width = blocks_for(max(s.length for s in rows), block_size)
    tables = torch.tensor([_padded(s.table, width) for s in rows], dtype=torch.long)
    # query i of a span sees the cache up to and including its own position
    seen = torch.tensor([s.start for s in rows]).view(-1, 1, 1) + torch.arange(1, count + 1).view(1, -1, 1)
    visible = torch.arange(width * block_size).view(1, 1, -1) < seen  # [spans, count, positions]
    mask = _additive(visible, dtype).unsqueeze(1)  # [spans, 1, count, positions]
    if count > 1:
        mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(len(rows), 1, group * count, -1)
    return AttentionGroup(rows[0].offset, rows[-1].offset + count, count, tables.to(device), mask.to(device),
                          _run_start(rows, width))


def _run_start(rows: list[Span], width: int) -> int | None:
    """The first block of a lone span whose first `width` blocks are consecutive ids (None otherwise)."""
    if len(rows) != 1:
        return None
    table = rows[0].table
    first = table[0]
    return first if all(block == first + i for i, block in enumerate(table[:width])) else None


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What SDPA makes of a boolean mask on every call, made once."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _padded(table: list[int], width: int) -> list[int]:
    """Pad with the row's own first block: any valid id works, the mask hides it."""
    return table[:width] + [table[0]] * (width - min(width, len(table)))
