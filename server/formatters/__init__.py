"""Response formatters: LMI json/jsonlines/sse/TGI, OpenAI chat and completions."""

from __future__ import annotations

from llm_endpoint.server.formatters.base import ResponseFormatter
from llm_endpoint.server.formatters.chat import ChatChunkFormatter, ChatCompletionFormatter
from llm_endpoint.server.formatters.completions import CompletionChunkFormatter, CompletionFormatter
from llm_endpoint.server.formatters.lmi import LmiJsonFormatter, LmiStreamFormatter
from llm_endpoint.server.protocol import OutputOptions


def make_formatter(options: OutputOptions, request_id: str) -> ResponseFormatter:
    """The formatter for one request.

    LMI requests follow `options.formatter`, as djl-serving's `get_output_formatter` does (a configured
    `jsonlines` streams even without `"stream": true`); `tgi_compat` only changes what they write. Chat
    and completions requests follow `options.stream`, then take SSE unless `jsonlines` was asked for.
    """
    if options.kind == "chat":
        chat_cls = ChatChunkFormatter if options.stream else ChatCompletionFormatter
        return chat_cls(options, request_id)
    if options.kind == "completion":
        completion_cls = CompletionChunkFormatter if options.stream else CompletionFormatter
        return completion_cls(options, request_id)
    if options.formatter == "json":
        return LmiJsonFormatter(options, request_id)
    return LmiStreamFormatter(options, request_id)
