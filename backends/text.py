"""Incremental detokenization and stop-sequence handling shared by engines that produce token ids.

Streaming text must equal the final text exactly: leading spaces kept (decode with context, not token by
token), a multi-byte UTF-8 character released only once complete, and a stop sequence that spans tokens
never released at all (text that could still become a stop sequence is held back until it cannot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# Prompt tokens kept as decoding context so the first generated token keeps its leading space.
_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


def ids_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces=False)`, through the Rust
    tokenizer directly when there is one: that is all transformers' fast `decode` does with clean-up off, at a
    third of the cost (this runs twice per generated token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """vLLM/TGI-style prefix/read offsets over the token stream; O(window) work per token.

    `special_ids`: the tokenizer's special token ids, when the caller already has them (engines compute
    them once, not per request).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True,
                 special_ids: frozenset[int] | None = None) -> None:
        self._decode = ids_decoder(tokenizer, skip_special_tokens)
        if not skip_special_tokens:
            self._special: frozenset[int] = frozenset()
        else:
            self._special = special_ids if special_ids is not None else frozenset(tokenizer.all_special_ids)
        context = [t for t in prompt_ids if t not in self._special][-_CONTEXT_TOKENS:]
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def add(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is incomplete or for skipped specials)."""
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_INCOMPLETE):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (may contain U+FFFD for genuinely invalid bytes)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""


class StopSequenceFilter:
    """Releases text only once it can no longer be the start of a stop sequence."""

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop sequence matched). After a match, stop generating."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class TextAssembler:
    """Token ids in, exact text increments out, for one request."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop_sequences: Sequence[str] = (),
        skip_special_tokens: bool = True,
        special_ids: frozenset[int] | None = None,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens, special_ids)
        self._stops = StopSequenceFilter(stop_sequences)

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text released now, stop sequence matched)."""
        return self._stops.push(self.detokenizer.add(token_id))

    def finish(self) -> str:
        """Release held-back text when the request ends for a reason other than a stop sequence."""
        tail, _ = self._stops.push(self.detokenizer.flush())
        return tail + self._stops.flush()
