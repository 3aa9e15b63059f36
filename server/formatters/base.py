"""The formatter interface: token events in, response bytes out."""

from __future__ import annotations

import abc

from llm_endpoint.backends.types import TokenEvent
from llm_endpoint.server.protocol import OutputOptions


class ResponseFormatter(abc.ABC):
    """Turns one request's TokenEvents into its response.

    Both return frames: each one complete wire event (a JSON line, an SSE event, or a whole JSON body),
    because transports that carry a stream as separate messages (SageMaker's PayloadParts) must put exactly
    one event in each, and clients such as LiteLLM decode each message on its own.
    Streaming: the server sends the frames of `on_event(e)` for each event as it arrives (none: send
    nothing) and, if generation fails after the first byte, those of `on_error(msg)` last.
    Non-streaming: the server feeds every event to `on_event` (ignoring the return) and sends `body()`.
    """

    content_type: str

    def __init__(self, options: OutputOptions, request_id: str) -> None:
        self.options = options
        self.request_id = request_id

    @abc.abstractmethod
    def on_event(self, event: TokenEvent) -> list[str]: ...

    @abc.abstractmethod
    def on_error(self, message: str) -> list[str]: ...

    @abc.abstractmethod
    def body(self) -> bytes: ...
