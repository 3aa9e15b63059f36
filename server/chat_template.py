"""Chat templates rendered in jinja2's immutable sandbox, as transformers renders them, within a time and
size budget per request.

The sandbox already keeps templates from reaching Python; what it does not bound is work. User content is
data to a template, but a template's loops, string arithmetic and output run over it, and a template (or a
conversation built to feed one) can make that take minutes or gigabytes. So every call, attribute and item
lookup and arithmetic operator the template performs checks a deadline, operators that grow strings or
numbers check the result's size first, and the output stops at a character budget.
"""

from __future__ import annotations

import contextvars
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateBudgetExceeded(Exception):
    """The render ran past its deadline (`too_long` False) or its character budget (True)."""

    def __init__(self, message: str, too_long: bool) -> None:
        super().__init__(message)
        self.too_long = too_long


@dataclass
class _Budget:
    deadline: float
    timeout: float
    max_chars: int

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(
                f"the chat template did not finish rendering within chat_template_timeout={self.timeout:g} s",
                too_long=False)

    def check_size(self, size: float, what: str) -> None:
        if size > self.max_chars:
            raise TemplateBudgetExceeded(f"the chat template's {what} would exceed {self.max_chars} characters",
                                         too_long=True)


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise RuntimeError("chat templates render only through ChatTemplate.render")
    return budget


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; serving renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**"})

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _budget().check_time()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().check_time()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.check_time()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    budget.check_size(len(seq) * times, "repeated sequence")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.check_size(len(left) + len(right), "concatenation")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            budget.check_size(right * math.log2(abs(left)) / 8, "power")  # the result's size in bytes
        return super().call_binop(context, operator, left, right)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: plain JSON, without jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplateError(Exception):
    """option.chat_template names no readable file, or its template does not compile."""


def _override_source(value: str) -> str:
    """option.chat_template's template text: the value itself when it holds a `{` (no path does, in practice),
    else the file it names; checked to compile here so that a bad one stops start-up."""
    if "{" in value:
        source = value
    else:
        try:
            source = Path(value).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"invalid option.chat_template={value!r}: cannot read it ({exc}): expected a "
                                    "jinja file, or the template text itself") from None
    try:
        jinja2.Environment(extensions=[_GenerationTag, jinja2.ext.loopcontrols]).parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"invalid option.chat_template={value[:80]!r}: the template does not compile "
                                f"(line {exc.lineno}: {exc.message})") from None
    return source


class ChatTemplate:
    """One model's chat template, compiled once, with the variables transformers gives it."""

    def __init__(self, source: str, special_tokens: Mapping[str, Any]) -> None:
        """Raises jinja2's TemplateSyntaxError when `source` does not compile."""
        env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True,
                               extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        # A template renders tools only if it reads the `tools` variable; one that does not would silently
        # drop them (and the model would never know it could call any).
        self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        self.special_tokens = dict(special_tokens)

    @classmethod
    def of(cls, tokenizer: Any, override: str | None = None) -> ChatTemplate | None:
        """The template `override` (option.chat_template: a file, or template text when it holds a `{`), else
        the tokenizer's default (None when it has none). Raises ChatTemplateError for an unusable override."""
        if override is not None:
            return cls(_override_source(override), tokenizer.special_tokens_map)
        if getattr(tokenizer, "chat_template", None) is None:
            return None
        return cls(tokenizer.get_chat_template(), tokenizer.special_tokens_map)

    def render(self, messages: Sequence[Mapping[str, Any]], *, timeout: float, max_chars: int,
               add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text; `tools` are OpenAI's tool objects, as transformers passes them. Raises
        TemplateBudgetExceeded past the budget, jinja2's TemplateError (including the template's own
        raise_exception) when the messages do not fit the template."""
        budget = _Budget(time.monotonic() + timeout, timeout, max_chars)
        token = _BUDGET.set(budget)
        try:
            parts: list[str] = []
            size = 0
            for part in self.template.generate(messages=list(messages), tools=list(tools) if tools else None, documents=None,
                                               add_generation_prompt=add_generation_prompt, **self.special_tokens):
                size += len(part)
                budget.check_size(size, "output")
                budget.check_time()
                parts.append(part)
            return "".join(parts)
        finally:
            _BUDGET.reset(token)
