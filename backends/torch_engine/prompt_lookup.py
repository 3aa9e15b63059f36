"""Prompt lookup decoding's drafts: the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (n from `max_ngram` down to 1), over prompt and output alike. On input-grounded work
(summaries, extraction, edits) the output often repeats the prompt, and a whole run of such tokens is then
verified in one forward pass instead of one pass per token.

The index grows with the sequence, a few dictionary writes per token, so proposing never rescans the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_NGRAM = 3

# A step's time ~ a + b * tokens, with a / b (the tokens it verifies for the price of reading the weights
# once) about this on the 2-core machines measured (a decode step ~30 ms alone, ~63 ms with 16 rows on a
# Xeon; open-ended text at 16 streams lost 30% with unconditional drafts, still 8% with 16 here).
STEP_TOKENS_PER_WEIGHT_READ = 8
# Beside other rows a verification also costs a batched attention call per layer of its own, whatever its
# length, so a sequence whose drafts hold less often than this does not draft at all (measured: open-ended
# text at 16 streams, 2% of tokens drafted at ~50% acceptance, still lost 5-7%).
MIN_RATE_BESIDE_OTHERS = 0.75
# ...and those attention calls cost the step about this many tokens' worth however few rows draft, so beside
# other rows a step verifies drafts only when together they are expected to add at least this many tokens
# (measured: open-ended text at 16 streams, drafts adding ~1.7 accepted tokens a step still lost 8%).
DRAFT_STEP_COST_TOKENS = 3.0
# Weight of the past in a sequence's acceptance estimate (per verification), and its starting belief.
ODDS_DECAY = 0.9
ODDS_PRIOR = 0.5

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


@dataclass
class DraftOdds:
    """A sequence's running estimate of the chance that a draft token is accepted given that the one before
    it was, and the draft length that pays for it at a given batch size.

    Alone in a batch a step reads every weight anyway, so even a poor draft is nearly free; beside other
    rows each verified token costs compute the batch shares, so the i-th draft token is worth it only while
    its chance of being used (rate ** i) beats that cost's share of the step, and a verification's own
    attention call asks for a rate of at least MIN_RATE_BESIDE_OTHERS. A sequence that does not draft is
    still scored for free: the draft it would have proposed is checked against the token it got.
    """

    hits: float = ODDS_PRIOR
    misses: float = 1 - ODDS_PRIOR
    shadow: int | None = None  # the first draft token it would have proposed this step

    @property
    def rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    def record(self, accepted: int, drafted: int) -> None:
        """A verification: `accepted` of `drafted` tokens held, the first one refused (if any) a miss."""
        self.hits = self.hits * ODDS_DECAY + accepted
        self.misses = self.misses * ODDS_DECAY + (accepted < drafted)

    def record_shadow(self, token: int) -> None:
        if self.shadow is not None:
            self.record(int(token == self.shadow), 1)
            self.shadow = None

    def expected(self, drafted: int) -> float:
        """Draft tokens expected to be accepted out of `drafted`."""
        return sum(self.rate ** i for i in range(1, drafted + 1))

    def length(self, limit: int, batch: int) -> int:
        """Draft tokens worth verifying beside `batch` running sequences (this one included), at most `limit`."""
        if batch <= 1:
            return limit
        rate, cost = self.rate, batch / (batch + STEP_TOKENS_PER_WEIGHT_READ)
        if rate <= max(cost, MIN_RATE_BESIDE_OTHERS):
            return 0
        return min(limit, int(math.log(cost) / math.log(rate)) if rate < 1 else limit)
