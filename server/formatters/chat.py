"""OpenAI chat-completions formatters: `chat.completion` bodies and `chat.completion.chunk` streams.

These follow OpenAI's wire format (as vLLM's server and LMI's async mode do) rather than LMI's classic chat
formatter, whose quirks would break OpenAI clients: LMI finish reasons, a one-element list for streaming
`logprobs`, `bytes` built from code points, no `model`, and (before mid-2026) no `[DONE]`.
"""

from __future__ import annotations

import time
from typing import Any

from llm_endpoint.backends.config import ResponseFormat
from llm_endpoint.backends.types import FinishReason, Token, TokenEvent
from llm_endpoint.server.formatters.lmi import (
    ERROR_CODE,
    BufferedFormatter,
    Transcript,
    dumps,
    frame,
    stream_framing,
)
from llm_endpoint.server.protocol import OutputOptions
from llm_endpoint.server.tool_calls import CallArguments, CallStart, Content, Piece, ToolCallParser

# OpenAI has no finish reason for a failed generation; "error" (LMI's own value) shows the failure where
# "stop" would pass it off as a normal end. The openai client does not validate the value.
FINISH_REASONS: dict[FinishReason, str] = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.ERROR: "error",
}

SSE_DONE = "data: [DONE]\n\n"


def _delta(pieces: list[Piece]) -> dict[str, Any]:
    """Content and tool-call pieces as one OpenAI delta (or message): content text, and per call its `index`,
    then `id`, `type` and name where it starts, and the arguments text that came with it."""
    delta: dict[str, Any] = {}
    content = "".join(p.text for p in pieces if isinstance(p, Content))
    if content:
        delta["content"] = content
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        if isinstance(piece, CallStart):
            calls[piece.index] = {"index": piece.index, "id": piece.id, "type": "function",
                                  "function": {"name": piece.name, "arguments": ""}}
        elif isinstance(piece, CallArguments):
            call = calls.setdefault(piece.index, {"index": piece.index, "function": {"arguments": ""}})
            call["function"]["arguments"] += piece.text
    if calls:
        delta["tool_calls"] = list(calls.values())
    return delta


def _logprob(token: Token) -> dict[str, Any]:
    """`bytes` is the UTF-8 encoding of the text; a token that completes no character yet has text "" and []."""
    return {"token": token.text, "logprob": token.log_prob, "bytes": list(token.text.encode())}


class OpenAIFormatter(BufferedFormatter):
    """What OpenAI chat and completions bodies and chunks share: identity, finish reasons, usage, stream
    chunks and their end, and the error event."""

    ID_PREFIX = "chatcmpl-"
    CHUNK_OBJECT = "chat.completion.chunk"

    def __init__(self, options: OutputOptions, request_id: str) -> None:
        super().__init__(options, request_id)
        self.completion_id = f"{self.ID_PREFIX}{request_id}"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        """One stream chunk; with `include_usage` every chunk has `"usage": null` but the last, as OpenAI
        documents."""
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": self.CHUNK_OBJECT,
            "created": self.created,
            "model": self.options.model,
            "choices": choices,
        }
        if self.options.include_usage:
            chunk["usage"] = usage
        return frame(dumps(chunk), self.framing)

    def _stream_end(self) -> list[str]:
        """After the last token: the usage chunk (no choices) when asked for, then `[DONE]` on SSE."""
        out = [self._chunk([], self._usage())] if self.options.include_usage else []
        return out + [SSE_DONE] if self.framing == "sse" else out

    def _tool_parser(self) -> ToolCallParser | None:
        """A reader of one choice's calls, when the request has tools to call."""
        if self.options.tool_calls is None:
            return None
        return ToolCallParser(self.options.tool_calls, self.options.max_tool_calls)

    @staticmethod
    def _finish_reason(transcript: Transcript, called: bool = False) -> str | None:
        """OpenAI's `tool_calls` when the model ended by itself after calling tools."""
        reason = transcript.finish_reason
        if called and reason in (FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE):
            return "tool_calls"
        return FINISH_REASONS[reason] if reason else None

    def _choices(self) -> list[Transcript]:
        """The finished candidates the response returns, as choices 0..n-1: all of them, or with `best_of`
        the n with the highest log-probability per token, best first (OpenAI's rule)."""
        if self.options.candidates == self.options.n:
            return self.transcripts
        ranked = sorted(self.transcripts, key=lambda t: t.mean_log_prob, reverse=True)
        return ranked[: self.options.n]

    def _logprobs_content(self, token: Token, top_tokens: list[Token]) -> dict[str, Any]:
        """One `logprobs.content[]` entry: the sampled token and the first `top_logprobs` alternatives."""
        return _logprob(token) | {"top_logprobs": [_logprob(t) for t in top_tokens[: self.options.top_logprobs]]}

    def _usage(self) -> dict[str, int]:
        """Completion tokens count every candidate's, `best_of`'s unreturned ones too (they were generated)."""
        prompt, completion = self.transcript.prompt_tokens, sum(len(t.tokens) for t in self.transcripts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def on_error(self, message: str) -> list[str]:
        """An OpenAI error object, `{"error": {"message", "type", "param", "code"}}`.

        The openai client raises `APIError(message)` for a stream event with an `error` key, but takes the
        message only from an object there (LMI's `{"error": msg, "code": 424}` would surface as a generic
        "An error occurred during streaming"). SSE ends with `[DONE]` after it, as vLLM does, so clients that
        read to `[DONE]` stop.
        """
        error = {"message": message, "type": "server_error", "param": None, "code": ERROR_CODE}
        chunk = frame(dumps({"error": error}), self.framing)
        return [chunk, SSE_DONE] if self.framing == "sse" else [chunk]


class ChatCompletionFormatter(OpenAIFormatter):
    """Non-streaming: one `chat.completion` object once generation ends."""

    @staticmethod
    def _framing(options: OutputOptions) -> ResponseFormat:
        return "json"

    def _render(self, event: TokenEvent) -> list[str]:
        if not self.all_finished:
            return []
        return [dumps({
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.options.model,
            "choices": [self._choice(index, t) for index, t in enumerate(self._choices())],
            "usage": self._usage(),
        })]

    def _choice(self, index: int, t: Transcript) -> dict[str, Any]:
        logprobs = None
        if self.options.logprobs:
            logprobs = {"content": [self._logprobs_content(tok, top) for tok, top in zip(t.tokens, t.top_tokens)]}
        message: dict[str, Any] = {"role": "assistant", "content": t.text}
        parser = self._tool_parser()
        if parser is not None:
            found = _delta(parser.feed(t.text) + parser.finish())
            message = {"role": "assistant", "content": found.get("content")}
            if "tool_calls" in found:
                message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in found["tool_calls"]]
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self._finish_reason(t, "tool_calls" in message),
        }


class ChatChunkFormatter(OpenAIFormatter):
    """Streaming `chat.completion.chunk`s as SSE (ending in `[DONE]`) or JSON lines (no `[DONE]`).

    Each choice's first chunk carries only the role, as OpenAI's and vLLM's do; with `n` > 1 the choices'
    chunks interleave as their tokens arrive, each naming its `index`. A token whose text is still pending
    ("") sends nothing unless its logprob or the finish reason must go out. With `include_usage`, every
    chunk has `"usage": null` and a last chunk with no choices carries the counts, as OpenAI documents; it
    and `[DONE]` follow the last choice's end.
    """

    _framing = staticmethod(stream_framing)

    def __init__(self, options: OutputOptions, request_id: str) -> None:
        super().__init__(options, request_id)
        self.tool_parsers = [self._tool_parser() for _ in self.transcripts]

    @staticmethod
    def _choice(
        index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _render(self, event: TokenEvent) -> list[str]:
        out: list[str] = []
        index, t = event.choice, self.transcripts[event.choice]
        if len(t.tokens) == 1:
            out.append(self._chunk([self._choice(index, {"role": "assistant", "content": ""}, None, None)]))
        parser = self.tool_parsers[index]
        delta: dict[str, Any] = {"content": event.token.text}
        if parser is not None:  # text that may belong to a call is held back; calls go out as tool_calls
            delta = _delta(parser.feed(event.token.text) + (parser.finish() if event.finished else []))
        if delta.get("content") or "tool_calls" in delta or self.options.logprobs or event.finished:
            logprobs = None
            if self.options.logprobs:
                logprobs = {"content": [self._logprobs_content(event.token, event.top_tokens)]}
            called = parser is not None and parser.calls > 0
            out.append(self._chunk([self._choice(index, delta, logprobs, self._finish_reason(t, called))]))
        if self.all_finished:
            out += self._stream_end()
        return out
