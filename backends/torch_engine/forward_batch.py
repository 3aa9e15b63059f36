"""One step's model input, laid out once per step and read by every layer: packed tokens, cache slots,
block tables and masks. Decode rows (one token each) come first, in order of length, and attend in groups
of similar length; each prefill chunk follows and attends on its own. No row is padded to another's length
in the linear layers, and in attention only within its group: one 8k-token row among short ones would
otherwise make every row's gathered keys and values 8k long, in every layer, every step."""

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
class DecodeGroup:
    start: int  # packed rows start..stop-1, one token each
    stop: int
    tables: torch.Tensor  # [rows, blocks], padded with each row's own first block
    mask: torch.Tensor  # [rows, 1, 1, blocks*block_size], additive


# A decode row joins the current group while its block count is at most this multiple of the group's first
# (shortest) row, or within this many blocks of it: padding costs at most ~2x a row's own reads.
GROUP_RATIO = 2
GROUP_SLACK_BLOCKS = 8


@dataclass
class PrefillAttention:
    offset: int
    count: int
    tables: torch.Tensor  # [1, blocks]
    # [1, 1, group*count, blocks*block_size], additive (0 where attention may look, -inf elsewhere); rows
    # repeat per query head of a key/value group, the layout `attention.attend` folds queries into.
    mask: torch.Tensor


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens], cache positions (what RoPE rotates by)
    slots: torch.Tensor  # [tokens], flat cache slots the new keys/values go to
    decode_groups: list[DecodeGroup]  # the leading single-token rows, shortest first
    prefills: list[PrefillAttention]

    @classmethod
    def build(
        cls, spans: list[Span], tokens: list[list[int]], *, block_size: int, group: int, dtype: torch.dtype,
        device: torch.device,
    ) -> ForwardBatch:
        """`spans` with their `tokens`, decode spans (count 1) first and in ascending length; `group` query
        heads per key/value head. Masks are built once here in the attention's dtype, so no layer converts
        them again."""
        num_decode = 0
        while num_decode < len(spans) and spans[num_decode].count == 1:
            num_decode += 1
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for span, toks in zip(spans, tokens):
            ids.extend(toks)
            positions.extend(range(span.start, span.start + span.count))
            slots.extend(slot_mapping(span.table, span.start, span.count, block_size))
        decode_groups = [_decode_group(spans, start, stop, block_size, dtype, device)
                         for start, stop in _similar_lengths(spans[:num_decode], block_size)]
        prefills = []
        for span in spans[num_decode:]:
            width = blocks_for(span.length, block_size)
            query_pos = torch.arange(span.start, span.length).view(-1, 1)
            mask = _additive(torch.arange(width * block_size).view(1, -1) <= query_pos, dtype)
            prefills.append(PrefillAttention(
                offset=span.offset, count=span.count,
                tables=torch.tensor([span.table[:width]], dtype=torch.long, device=device),
                mask=mask.view(1, 1, 1, span.count, -1).expand(1, 1, group, span.count, -1)
                .reshape(1, 1, group * span.count, -1).to(device),
            ))
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            decode_groups=decode_groups,
            prefills=prefills,
        )


def _similar_lengths(decode: list[Span], block_size: int) -> list[tuple[int, int]]:
    """Ranges of `decode` (ascending length) that attend as one batch."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for i, span in enumerate(decode):
        first = blocks_for(decode[start].length, block_size)
        blocks = blocks_for(span.length, block_size)
        if blocks > max(GROUP_RATIO * first, first + GROUP_SLACK_BLOCKS):
            ranges.append((start, i))
            start = i
    if decode:
        ranges.append((start, len(decode)))
    return ranges


def _decode_group(
    spans: list[Span], start: int, stop: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> DecodeGroup:
    rows = spans[start:stop]
    width = blocks_for(rows[-1].length, block_size)
    tables = torch.tensor([_padded(s.table, width) for s in rows], dtype=torch.long)
    lengths = torch.tensor([s.length for s in rows])
    visible = torch.arange(width * block_size).view(1, -1) < lengths.view(-1, 1)
    mask = _additive(visible, dtype).view(len(rows), 1, 1, -1)
    return DecodeGroup(start, stop, tables.to(device), mask.to(device))


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What SDPA makes of a boolean mask on every call, made once."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _padded(table: list[int], width: int) -> list[int]:
    """Pad with the row's own first block: any valid id works, the mask hides it."""
    return table[:width] + [table[0]] * (width - min(width, len(table)))
