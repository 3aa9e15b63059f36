"""The formatter interface: token events in, response bytes out."""

from __future__ import annotations

import abc

from llm_endpoint.backends.types import TokenEvent
from llm_endpoint.server.protocol import OutputOptions


class ResponseFormatter(abc.ABC):
    """Turns one request's TokenEvents into its response.

    Streaming: the server sends `on_event(e)` for each event as it arrives ("" means send nothing) and, if
    generation fails after the first byte, `on_error(msg)` as the last chunk.
    Non-streaming: the server feeds every event to `on_event` (ignoring the return) and sends `body()`.
    """

    content_type: str

    def __init__(self, options: OutputOptions, request_id: str) -> None:
        self.options = options
        self.request_id = request_id

    @abc.abstractmethod
    def on_event(self, event: TokenEvent) -> str: ...

    @abc.abstractmethod
    def on_error(self, message: str) -> str: ...

    @abc.abstractmethod
    def body(self) -> bytes: ...
