"""RequestParser decisions that no response shows directly (what it asks the engine for)."""

from __future__ import annotations

from typing import Any

import pytest

from llm_endpoint.server.request_parser import RequestParser
from tests.conftest import make_config

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("payload", "config", "accept", "expected"),
    [
        ({"inputs": "Hi"}, {}, None, False),  # {"generated_text"} only
        ({"inputs": "Hi", "parameters": {"details": True}}, {}, None, True),
        ({"inputs": "Hi", "stream": True}, {}, None, True),  # every streamed token object has a log_prob
        ({"inputs": "Hi"}, {"output_formatter": "jsonlines"}, None, True),  # a configured jsonlines streams
        ({"inputs": "Hi"}, {}, "application/jsonlines", True),
        ({"inputs": "Hi"}, {"tgi_compat": True}, None, True),  # TGI bodies default to details
        ({"inputs": "Hi", "parameters": {"details": False}}, {"tgi_compat": True}, None, False),
        ({"messages": CHAT}, {}, None, False),
        ({"messages": CHAT, "stream": True}, {}, None, False),
        ({"messages": CHAT, "logprobs": True}, {}, None, True),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 2, "stream": True}, {}, None, True),
    ],
)
def test_token_logprobs_asked_only_when_the_response_shows_them(
    tokenizer: Any, payload: dict, config: dict, accept: str | None, expected: bool
) -> None:
    parser = RequestParser(make_config(model_id="demo", **config), tokenizer, max_model_len=2048)
    parsed = parser.parse(payload, "r1", accept=accept)
    assert parsed.generation.params.token_logprobs is expected
