"""What can go wrong in an engine: at start-up (BackendUnavailable) or for one request (BackendError)."""

from __future__ import annotations


class BackendUnavailable(Exception):
    """The configured engine cannot run here; the message says what is missing."""


class BackendError(Exception):
    """A request failed inside the engine; the message is safe to show to the client."""


class RequestRejected(BackendError):
    """The engine refused a request before generating (e.g. too long for the engine)."""


def prompt_too_long(prompt_tokens: int, max_model_len: int) -> str:
    """The one wording of the prompt-length refusal, whether the parser or an engine finds it."""
    return (
        f"Input too long: the prompt has {prompt_tokens} tokens, but option.max_model_len is {max_model_len} "
        f"(at most {max_model_len - 1} prompt tokens)"
    )
