"""LMI response formatters: `json`, `jsonlines`, `sse` and their `tgi_compat` variants.

The bytes follow djl-serving's `output_formatter.py`: `json.dumps(obj, ensure_ascii=False)` with Python's
default separators, which is what LMI's own unit tests compare against. The building blocks that the chat
formatters share (`Transcript`, `BufferedFormatter`, `frame`, `dumps`) live here too.
"""

from __future__ import annotations

import abc
import json
import math
from typing import Any

from llm_endpoint.backends.config import ResponseFormat
from llm_endpoint.backends.types import FinishReason, Token, TokenEvent
from llm_endpoint.server.formatters.base import ResponseFormatter
from llm_endpoint.server.protocol import OutputOptions

CONTENT_TYPES: dict[ResponseFormat, str] = {
    "json": "application/json",
    "jsonlines": "application/jsonlines",
    "sse": "text/event-stream",
}

# The status LMI puts in every in-band error (`{"error": msg, "code": 424}`, as djl-serving's output formatters write it).
ERROR_CODE = 424


def dumps(obj: Any) -> str:
    """LMI's JSON encoding: default separators, non-ASCII text kept as UTF-8 rather than \\u escapes."""
    return json.dumps(obj, ensure_ascii=False)


def stream_framing(options: OutputOptions) -> ResponseFormat:
    """A stream is SSE when the request resolved to `sse`, else JSON lines."""
    return "sse" if options.formatter == "sse" else "jsonlines"


def frame(payload: str, framing: ResponseFormat) -> str:
    """One JSON document as the wire format carries it: a bare body, a line, or an SSE event."""
    if framing == "sse":
        return f"data: {payload}\n\n"
    if framing == "jsonlines":
        return payload + "\n"
    return payload


class Transcript:
    """Everything a formatter must remember of one generation to write its final chunk or body."""

    def __init__(self) -> None:
        self.tokens: list[Token] = []
        self.top_tokens: list[list[Token]] = []
        self.prefill: list[Token] | None = None
        self.finish_reason: FinishReason | None = None
        self.prompt_tokens = 0

    def add(self, event: TokenEvent) -> None:
        self.tokens.append(event.token)
        self.top_tokens.append(event.top_tokens)
        if event.prefill is not None:
            self.prefill = event.prefill
        if event.finished:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)

    @property
    def has_top_tokens(self) -> bool:
        return any(self.top_tokens)

    @property
    def mean_log_prob(self) -> float:
        """The log-probability per token that OpenAI's `best_of` ranks candidates by (tokens without one
        count as impossible)."""
        return sum(t.log_prob if t.log_prob is not None else -math.inf for t in self.tokens) / max(1, len(self.tokens))


class BufferedFormatter(ResponseFormatter):
    """Keeps what `on_event` returned, so `body()` is exactly the streamed bytes.

    A whole-body formatter returns no frame until the final event and then the complete body (as LMI's `json`
    formatter does); a streaming one returns its chunks. Either way the response is the same whether the
    server streams it or sends `body()`, so the choice of transport can never change the bytes.
    """

    def __init__(self, options: OutputOptions, request_id: str) -> None:
        super().__init__(options, request_id)
        self.framing = self._framing(options)
        self.content_type = CONTENT_TYPES[self.framing]
        # One per candidate generation (OpenAI `n` / `best_of`; LMI bodies have one), by `TokenEvent.choice`.
        self.transcripts = [Transcript() for _ in range(options.candidates)]
        self._frames: list[str] = []

    @property
    def transcript(self) -> Transcript:
        """The first (for LMI bodies: the only) candidate's transcript."""
        return self.transcripts[0]

    @property
    def all_finished(self) -> bool:
        return all(t.finish_reason is not None for t in self.transcripts)

    def on_event(self, event: TokenEvent) -> list[str]:
        self.transcripts[event.choice].add(event)
        frames = self._render(event)
        self._frames.extend(frames)
        return frames

    def body(self) -> bytes:
        return "".join(self._frames).encode()

    @staticmethod
    @abc.abstractmethod
    def _framing(options: OutputOptions) -> ResponseFormat: ...

    @abc.abstractmethod
    def _render(self, event: TokenEvent) -> list[str]:
        """The frames for `event` (one complete wire event each); its choice's transcript already includes it."""


class _LmiFormatter(BufferedFormatter):
    """What every LMI formatter shares: token objects, `details`, `generated_text` and the error chunk."""

    def _token(self, token: Token) -> dict[str, Any]:
        """`Token.as_dict` / `as_tgi_dict` of djl-serving: the special flag appears only when true."""
        if self.options.tgi_compat:
            out: dict[str, Any] = {"id": token.id, "text": token.text, "logprob": token.log_prob}
            special_key = "special"
        else:
            out = {"id": token.id, "text": token.text, "log_prob": token.log_prob}
            special_key = "special_token"
        if token.special:
            out[special_key] = True
        return out

    def _generated_text(self) -> str:
        prefix = self.options.inputs if self.options.return_full_text else ""
        return prefix + self.transcript.text

    def _details(self, include_tokens: bool) -> dict[str, Any]:
        """djl-serving `get_details_dict`: the requested details, else only an error's finish_reason, else {}.

        `prefill` and `top_tokens` appear when the engine produced them (it does exactly when
        `decoder_input_details` / `top_n_tokens>0` were asked).
        """
        t = self.transcript
        finish_reason = t.finish_reason.value if t.finish_reason else None
        if not self.options.details:
            return {"finish_reason": finish_reason} if t.finish_reason is FinishReason.ERROR else {}
        details: dict[str, Any] = {
            "finish_reason": finish_reason,
            "generated_tokens": len(t.tokens),
            "inputs": self.options.inputs,
        }
        if include_tokens:
            details["tokens"] = [self._token(token) for token in t.tokens]
        if t.prefill is not None:
            details["prefill"] = [self._token(token) for token in t.prefill]
        if t.has_top_tokens:
            details["top_tokens"] = [[self._token(token) for token in top] for top in t.top_tokens]
        return details

    def on_error(self, message: str) -> list[str]:
        """The object LMI's front end writes when generation fails: `{"error":msg,"code":424}`.

        It is compact because LMI's Java side (GSON) writes it. Unlike LMI, which appends it to a stream with
        no line ending (and, for `sse`, with no `data: ` prefix), it is framed like every other chunk: a
        jsonlines stream ends it with "\\n" so line-based clients parse it, an SSE stream sends it as a
        `data:` event (huggingface_hub raises on such an event). `json` gets the bare object, LMI's error body.
        """
        payload = json.dumps({"error": message, "code": ERROR_CODE}, ensure_ascii=False, separators=(",", ":"))
        return [frame(payload, self.framing)]


class LmiJsonFormatter(_LmiFormatter):
    """Non-streaming: `{"generated_text", "details"?}` once generation ends; a one-element array for TGI."""

    @staticmethod
    def _framing(options: OutputOptions) -> ResponseFormat:
        return "json"

    def _render(self, event: TokenEvent) -> list[str]:
        if not event.finished:
            return []
        result: dict[str, Any] = {"generated_text": self._generated_text()}
        details = self._details(include_tokens=True)
        if details:
            result["details"] = details
        return [dumps([result] if self.options.tgi_compat else result)]


class LmiStreamFormatter(_LmiFormatter):
    """Streaming `jsonlines` or `sse`: one `{"token"}` object per event, the final one with the full text.

    Per-token `top_tokens` are not put on the lines (djl-serving does not); they appear in the final details.
    """

    _framing = staticmethod(stream_framing)

    def _render(self, event: TokenEvent) -> list[str]:
        line: dict[str, Any] = {"token": self._token(event.token)}
        if event.finished:
            line["generated_text"] = self._generated_text()
            details = self._details(include_tokens=False)
            if details:
                line["details"] = details
        return [frame(dumps(line), self.framing)]
