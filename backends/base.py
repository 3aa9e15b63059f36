"""The interface every engine implements, so the HTTP layer never changes when the engine does."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from llm_endpoint.backends.types import GenerationRequest, TokenEvent


@dataclass
class BackendStats:
    """Live load figures, exported as metrics and used for admission control."""

    running: int = 0
    waiting: int = 0
    # KV-cache blocks, for engines that page their cache (ours); 0 total where the engine does not say.
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    session_kv_bytes: int = 0  # KV that idle stateful sessions keep (ours)
    # forward steps so far, through torch.compile (`option.compile_decode`) or eager (ours)
    compiled_steps: int = 0
    eager_steps: int = 0

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used


class Backend(abc.ABC):
    """An engine that serves many concurrent generations.

    Lifecycle: constructed cheaply, `load()` (blocking, may take minutes, runs off the event loop),
    `generate()` any number of times concurrently, `shutdown()`.
    Cancelling the iterator returned by `generate()` (client disconnect) must abort the request and free
    its resources; an exception must fail that request alone.
    """

    name: str = "base"
    # Whether the engine can report the most likely alternatives per token (top_n_tokens / top_logprobs).
    supports_top_tokens: bool = True

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights and start the engine. Blocking."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Yield one TokenEvent per generated token; the last one has `finish_reason` set."""

    @abc.abstractmethod
    def stats(self) -> BackendStats:
        """Current running and waiting request counts."""

    def prompt_lookup_refusal(self, tokens: int) -> str | None:
        """Why a request's own `prompt_lookup_num_tokens=tokens` cannot be served (None when it can).
        Default: an engine without prompt lookup serves only 0."""
        return None if tokens == 0 else "it has no prompt lookup decoding (option.rolling_batch=scheduler has)"

    def close_session(self, session_id: str) -> None:
        """Forget what the engine keeps for a stateful session (closed or expired). Default: nothing kept,
        as with engines whose prefix cache reuses a session's history on its own."""
        return None

    def shutdown(self) -> None:
        """Stop background work. Default: nothing to stop."""
        return None
