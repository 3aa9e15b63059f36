"""A request's state inside the engine, and the typed commands other threads send the engine thread."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm_endpoint.backends.text import TextAssembler
from llm_endpoint.backends.torch_engine.grammar import Constraint
from llm_endpoint.backends.torch_engine.prompt_lookup import DraftOdds, NgramProposer
from llm_endpoint.backends.torch_engine.sampling import Seen
from llm_endpoint.backends.types import GenerationRequest, Token, TokenEvent

Deliver = Callable[[TokenEvent | BaseException], None]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Engine-thread state of one request.

    `tokens` is prompt + output so far. `computed` counts the tokens of `tokens` already fed through the
    model; `cache_len` counts the key/value entries the sequence holds in the cache: fewer once attention
    sinks evicted some. Positions are cache positions.
    """

    request: GenerationRequest
    deliver: Deliver
    assembler: TextAssembler
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    cache_len: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    prefill_logprobs: list[Token] | None = None  # LMI `decoder_input_details`, filled during prefill
    cancelled: bool = False
    cached_prompt: int = 0  # prompt tokens taken from the session's cache instead of computed
    proposer: NgramProposer | None = None  # prompt lookup's drafts, when the request asked for them
    # structured output's matcher; it follows the output tokens, which preemption keeps, so recomputing
    # the cache leaves it right. Constrained sequences do not draft (their drafts are not grammar-checked).
    constraint: Constraint | None = None
    drafted: int = 0
    accepted: int = 0
    draft_odds: DraftOdds = field(default_factory=DraftOdds)  # whether drafting pays for this sequence

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def pending(self) -> int:
        """Tokens not yet fed to the model: the prompt (or, after preemption, everything) or the last output."""
        return len(self.tokens) - self.computed

    def history(self) -> Seen:
        """The tokens so far, for the penalties that depend on them."""
        return Seen(torch.tensor(self.tokens, dtype=torch.long), self.num_prompt)

    def reset_cache(self) -> None:
        """Forget the cache (preemption): every token is fed again, nothing emitted is lost."""
        self.computed = 0
        self.cache_len = 0


@dataclass(frozen=True)
class Add:
    seq: Sequence


@dataclass(frozen=True)
class Abort:
    seq: Sequence


@dataclass(frozen=True)
class CloseSession:
    session_id: str


Command = Add | Abort | CloseSession
