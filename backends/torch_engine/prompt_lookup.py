"""Prompt lookup decoding's drafts: the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (n from `max_ngram` down to 1), over prompt and output alike. On input-grounded work
(summaries, extraction, edits) the output often repeats the prompt, and a whole run of such tokens is then
verified in one forward pass instead of one pass per token.

The index grows with the sequence, a few dictionary writes per token, so proposing never rescans the text.
"""

from __future__ import annotations

DEFAULT_MAX_NGRAM = 3

class NgramProposer:
    def __init__(self, max_ngram: int) -> None:
        if max_ngram < 1:
            raise ValueError("option.prompt_lookup_max_ngram must be at least 1")
        self.max_ngram = max_ngram
        # per n: n-gram -> position of the token that followed its latest occurrence
        self._follower: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]
        self._indexed = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` draft tokens to follow `tokens` (the sequence so far), or none."""
        self._index(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            follower = self._follower[n - 1].get(tuple(tokens[-n:]))
            if follower is not None:
                return tokens[follower : follower + k]
        return []

    def _index(self, tokens: list[int]) -> None:
        # token t follows the n-grams ending just before it; the sequence's own last n-grams have no
        # follower yet, so a lookup finds their previous occurrence
        for t in range(max(self._indexed, 1), len(tokens)):
            for n in range(1, min(self.max_ngram, t) + 1):
                self._follower[n - 1][tuple(tokens[t - n : t])] = t
        self._indexed = len(tokens)
