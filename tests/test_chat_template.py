"""The budgeted chat-template renderer: the same text transformers renders, and bounded work."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest

from llm_endpoint.server.chat_template import ChatTemplate, TemplateBudgetExceeded

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and {{ 3*3 }}? {% raw %}"}],
    [{"role": "user", "content": "ünïcødé \U0001f600 <|im_end|> text"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": ""}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_what_transformers_renders(tokenizer: Any, conversation: list, add_generation_prompt: bool) -> None:
    template = ChatTemplate.of(tokenizer)
    assert template is not None
    ours = template.render(conversation, timeout=5, max_chars=100_000, add_generation_prompt=add_generation_prompt)
    theirs = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


HOSTILE = {
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "within"),
    "doubling string": ('{% set ns = namespace(s="x") %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}'
                        "{% endfor %}{{ ns.s }}", "concatenation"),
    "repeated content": ("{{ messages[0].content * 10**8 }}", "repeated sequence"),
    "huge power": ("{{ 7 ** (10 ** 8) }}", "power"),
    "endless output": ("{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}", "output"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_work_stops_at_the_budget(name: str) -> None:
    source, what = HOSTILE[name]
    template = ChatTemplate(source, {})
    with pytest.raises(TemplateBudgetExceeded) as err:
        template.render([{"role": "user", "content": "y" * 1000}], timeout=0.5, max_chars=100_000)
    assert what in str(err.value)


def test_the_sandbox_still_refuses_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render([{"role": "user", "content": "x"}], timeout=1, max_chars=1000)


def test_raise_exception_and_generation_blocks_behave_as_in_transformers() -> None:
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                            "{% generation %}[{{ messages[0].content }}]{% endgeneration %}", {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "a"}], timeout=1, max_chars=100) == "[a]"
    with pytest.raises(jinja2.exceptions.TemplateError, match="user first"):
        template.render([{"role": "system", "content": "a"}], timeout=1, max_chars=100)
