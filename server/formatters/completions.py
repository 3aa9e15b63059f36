"""OpenAI (legacy) completions formatters: `text_completion` bodies and streams, as OpenAI and vLLM write them.

`logprobs` is the legacy shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of the first
`logprobs` alternatives per token) and `text_offset` (where each token starts in the choice's text, after the
echoed prompt when `echo` is on).
"""

from __future__ import annotations

from typing import Any

from llm_endpoint.backends.config import ResponseFormat
from llm_endpoint.backends.types import Token, TokenEvent
from llm_endpoint.server.formatters.chat import OpenAIFormatter
from llm_endpoint.server.formatters.lmi import dumps, stream_framing
from llm_endpoint.server.protocol import OutputOptions


class _CompletionFormatter(OpenAIFormatter):
    ID_PREFIX = "cmpl-"
    CHUNK_OBJECT = "text_completion"

    @property
    def _echo(self) -> str:
        return self.options.inputs if self.options.echo else ""

    def _logprobs(self, tokens: list[Token], top_tokens: list[list[Token]], offset: int) -> dict[str, Any] | None:
        """The legacy logprobs of `tokens`, the first of which starts at `offset` in the choice's text."""
        if not self.options.logprobs:
            return None
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token.text)
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.log_prob for t in tokens],
            "top_logprobs": [{t.text: t.log_prob for t in top[: self.options.top_logprobs]} for top in top_tokens],
            "text_offset": offsets,
        }

    def _choice(self, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self._finish_reason()}


class CompletionFormatter(_CompletionFormatter):
    """Non-streaming: one `text_completion` object once generation ends."""

    @staticmethod
    def _framing(options: OutputOptions) -> ResponseFormat:
        return "json"

    def _render(self, event: TokenEvent) -> list[str]:
        if not event.finished:
            return []
        t = self.transcript
        echo = self._echo
        return [dumps({
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.options.model,
            "choices": [self._choice(echo + t.text, self._logprobs(t.tokens, t.top_tokens, len(echo)))],
            "usage": self._usage(),
        })]


class CompletionChunkFormatter(_CompletionFormatter):
    """Streaming `text_completion` chunks, one per token (the echoed prompt goes with the first), as SSE ending
    in `[DONE]` or JSON lines; a token whose text is still pending sends nothing unless its logprob or the
    finish reason must go out."""

    _framing = staticmethod(stream_framing)

    def _render(self, event: TokenEvent) -> list[str]:
        out: list[str] = []
        echo = self._echo if len(self.transcript.tokens) == 1 else ""
        text = echo + event.token.text
        if text or self.options.logprobs or event.finished:
            start = len(self._echo) + len(self.transcript.text) - len(event.token.text)
            out.append(self._chunk([self._choice(text, self._logprobs([event.token], [event.top_tokens], start))]))
        if event.finished:
            out += self._stream_end()
        return out
