"""OpenAI (legacy) completions formatters: `text_completion` bodies and streams, as OpenAI and vLLM write them.

`logprobs` is the legacy shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of the first
`logprobs` alternatives per token) and `text_offset` (where each token starts in the choice's text). With
`echo` the prompt's tokens come first, the first of them with a null log-prob, as OpenAI writes them.
"""

from __future__ import annotations

from typing import Any

from llm_endpoint.backends.config import ResponseFormat
from llm_endpoint.backends.types import Token, TokenEvent
from llm_endpoint.server.formatters.chat import OpenAIFormatter
from llm_endpoint.server.formatters.lmi import Transcript, dumps, stream_framing
from llm_endpoint.server.protocol import OutputOptions


class _CompletionFormatter(OpenAIFormatter):
    ID_PREFIX = "cmpl-"
    CHUNK_OBJECT = "text_completion"

    @property
    def _echo(self) -> str:
        return self.options.inputs if self.options.echo else ""

    def _logprobs(
        self, tokens: list[Token], top_tokens: list[list[Token]], offset: int, prefill: list[Token] | None = None
    ) -> dict[str, Any] | None:
        """The legacy logprobs of `tokens`, the first of which starts at `offset` in the choice's text; with
        `prefill` (the echoed prompt's tokens, from offset 0) those come first. Prompt tokens carry no
        alternatives (the engines compute only each prompt token's own log-prob): their `top_logprobs` are
        null, as OpenAI's are for the first prompt token."""
        if not self.options.logprobs:
            return None
        prefill = prefill or []
        offsets = []
        position = 0
        for token in prefill:
            offsets.append(position)
            position += len(token.text)
        for token in tokens:
            offsets.append(offset)
            offset += len(token.text)
        tops: list[dict[str, float | None] | None] = [None] * len(prefill)
        tops += [{t.text: t.log_prob for t in top[: self.options.top_logprobs]} for top in top_tokens]
        return {
            "tokens": [t.text for t in prefill + tokens],
            "token_logprobs": [t.log_prob for t in prefill + tokens],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _choice(self, index: int, t: Transcript, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": self._finish_reason(t)}


class CompletionFormatter(_CompletionFormatter):
    """Non-streaming: one `text_completion` object once every candidate has finished."""

    @staticmethod
    def _framing(options: OutputOptions) -> ResponseFormat:
        return "json"

    def _render(self, event: TokenEvent) -> list[str]:
        if not self.all_finished:
            return []
        echo = self._echo
        choices = [
            self._choice(index, t, echo + t.text, self._logprobs(t.tokens, t.top_tokens, len(echo), t.prefill))
            for index, t in enumerate(self._choices())
        ]
        return [dumps({
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.options.model,
            "choices": choices,
            "usage": self._usage(),
        })]


class CompletionChunkFormatter(_CompletionFormatter):
    """Streaming `text_completion` chunks, one per token (each choice's echoed prompt goes with its first), as
    SSE ending in `[DONE]` or JSON lines; with `n` > 1 the choices' chunks interleave, each naming its `index`.
    A token whose text is still pending sends nothing unless its logprob or the finish reason must go out."""

    _framing = staticmethod(stream_framing)

    def _render(self, event: TokenEvent) -> list[str]:
        out: list[str] = []
        t = self.transcripts[event.choice]
        first = len(t.tokens) == 1
        echo = self._echo if first else ""
        text = echo + event.token.text
        if text or self.options.logprobs or event.finished:
            start = len(self._echo) + len(t.text) - len(event.token.text)
            logprobs = self._logprobs([event.token], [event.top_tokens], start, event.prefill if first else None)
            out.append(self._chunk([self._choice(event.choice, t, text, logprobs)]))
        if self.all_finished:
            out += self._stream_end()
        return out
