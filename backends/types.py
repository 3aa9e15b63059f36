"""The contract between the server and every engine: what a generation asks for and what it yields.

The server tokenizes and validates; a backend only turns token ids into a stream of `TokenEvent`s.
Nothing here knows about HTTP or about response formats.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """LMI's finish reasons (`details.finish_reason`)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, already validated and defaulted by the server."""

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from the logit of every token the output already holds, once per occurrence
    # (frequency) or once (presence); -2..2, 0 = off.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_n_tokens: int = 0
    prompt_logprobs: bool = False  # LMI `decoder_input_details`
    # Whether the response shows each generated token's log-prob. An engine for which they cost extra work
    # (vLLM) may leave `Token.log_prob` None when this is False; the others report them anyway.
    token_logprobs: bool = True
    # Prompt lookup decoding: draft tokens per step copied from the prompt and output (0: off).
    prompt_lookup_num_tokens: int = 0
    # Structured output: the JSON schema (canonical JSON text, so it can key a grammar cache) the output must
    # match, enforced by constrained decoding; OpenAI's json_object is the schema {"type": "object"}.
    # None: free text.
    json_schema: str | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    @property
    def penalizes(self) -> bool:
        """Whether choosing a token depends on the tokens seen so far."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    prompt: str | None = None
    # A stateful session's id: an engine that can (ours) keeps the KV between the session's requests.
    session_id: str | None = None


@dataclass(frozen=True)
class Token:
    """One token as LMI reports it. `log_prob` is log-softmax of the raw logits (before any warping)."""

    id: int
    text: str
    log_prob: float | None
    special: bool = False


@dataclass
class TokenEvent:
    """What a backend yields: one generated token, and on the last event the finish reason.

    `text` of the token is the exact increment of the output text: it may be "" while a multi-byte
    character or a possible stop sequence is still pending, and it never contains a matched stop sequence.
    """

    token: Token
    top_tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prefill: list[Token] | None = None  # only on the first event, when prompt_logprobs was asked
    prompt_tokens: int = 0  # filled on the final event
    cached_tokens: int = 0  # final event: prompt tokens whose KV the engine reused (session or prefix cache)
    draft_tokens: int = 0  # final event: prompt-lookup draft tokens proposed for the request
    accepted_draft_tokens: int = 0  # ... and how many of them verification kept
    # Which of an OpenAI request's `n` / `best_of` candidates this token belongs to: engines yield 0, the
    # server's fan-out (server/choices.py) tags each candidate's events.
    choice: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
