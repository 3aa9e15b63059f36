"""Tool calls in a model's output: text in, OpenAI content and tool-call pieces out, as the text arrives.

Two shapes of output hold calls. `hermes` (Hermes and Qwen2.5 templates, vLLM's `hermes` parser): free text
with calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `json`: what constrained
decoding produces for `tool_choice="required"` or a named function, a JSON array of such call objects and
nothing else. The same incremental reader serves streaming (its pieces become deltas) and whole responses
(their accumulation), so the two can never disagree. Nothing here knows of engines or HTTP.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ToolCallFormat = Literal["hermes", "json"]
TOOL_CALL_PARSERS: tuple[str, ...] = ("hermes",)
OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_ARGUMENT_KEYS = ("arguments", "parameters")  # some Hermes-style models write "parameters"


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    """A call's first piece: its index among the response's calls, its id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """More of call `index`'s arguments, as JSON text (the fragments concatenate to the whole)."""

    index: int
    text: str


Piece = Content | CallStart | CallArguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def constrained_schema(functions: Sequence[tuple[str, dict[str, Any] | None]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of output that is nothing but calls to `functions` (name, parameters schema): an array
    of at least one call object (exactly one unless `parallel`), each naming one function and giving
    arguments its parameters accept."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                # OpenAI: a function without parameters takes none
                "arguments": params if params is not None else {"type": "object", "properties": {},
                                                                "additionalProperties": False},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, params in functions
    ]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass
class _CallObject:
    """One call's JSON object, read a character at a time: its name once the name string closes, and the raw
    text of its arguments as it arrives (an arguments value written as a JSON string is decoded to its text).
    `broken`: the text is not such an object."""

    depth: int = 0
    state: Literal["key", "colon", "value", "after"] = "key"
    in_string: bool = False
    escaped: bool = False
    key: str | None = None
    string: list[str] = field(default_factory=list)
    name: str | None = None
    arguments: list[str] = field(default_factory=list)  # text not yet handed out
    has_arguments: bool = False
    done: bool = False
    broken: bool = False

    def feed(self, char: str) -> None:
        raw_arguments = self.depth >= 2 and self.key in _ARGUMENT_KEYS
        if raw_arguments:
            self.arguments.append(char)
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                if self.depth == 1:
                    self._string_end()
                return
            if self.depth == 1:
                self.string.append(char)
        elif char in " \t\r\n":
            pass
        elif self.depth == 0:
            if char == "{":
                self.depth = 1
            else:
                self.broken = True
        elif self.depth >= 2:
            if char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self.state = "after"
            elif char == '"':
                self.in_string = True
        else:
            self._structural(char)

    def _structural(self, char: str) -> None:
        """A character between the object's own keys and values (depth 1, outside strings)."""
        if char == '"' and self.state in ("key", "value"):
            self.in_string, self.string = True, []
        elif char == ":" and self.state == "colon":
            self.state = "value"
        elif char == "," and self.state == "after":
            self.state, self.key = "key", None
        elif char == "}" and self.state in ("key", "after"):
            self.depth, self.done = 0, True
        elif char in "{[" and self.state == "value":
            self.depth = 2
            if self.key in _ARGUMENT_KEYS:
                self.arguments.append(char)
                self.has_arguments = True
        elif self.state == "value":  # a number, true, false or null: the rest of it is skipped
            self.state = "after"
        elif self.state != "after":
            self.broken = True

    def _string_end(self) -> None:
        try:
            text = json.loads('"' + "".join(self.string) + '"')
        except ValueError:
            self.broken = True
            return
        if self.state == "key":
            self.key, self.state = text, "colon"
            return
        if self.key == "name":
            self.name = text
        elif self.key in _ARGUMENT_KEYS:
            self.arguments.append(text)
            self.has_arguments = True
        self.state = "after"


class ToolCallParser:
    """One generation's output, fed as it arrives, as content and call pieces.

    Text that may still turn out to be part of a call (the start of a `<tool_call>` tag) is held until it is
    known not to be, so no tag text ever reaches the content. Whitespace next to calls is not content: a
    response whose text outside calls is blank has no content. A call beyond `max_calls` is read and dropped.
    """

    def __init__(self, fmt: ToolCallFormat, max_calls: int | None = None) -> None:
        self.format = fmt
        self.max_calls = max_calls
        self.calls = 0
        self._state: Literal["content", "call", "close", "array", "between"] = "content" if fmt == "hermes" else "array"
        self._buffer = ""
        self._blank = ""  # trailing whitespace of the content so far, held until more content follows
        self._call: _CallObject | None = None
        self._raw = ""  # the current call's text, tag included, while none of it has been handed out
        self._index: int | None = None  # the current call's index once it has started
        self._dropped = False  # the current call is one beyond max_calls

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        """The pieces still held once the output has ended: a cut-off tag prefix is the model's text; a call
        cut off before its name is dropped (it is neither a call nor an answer)."""
        pieces: list[Piece] = []
        if self._call is not None:
            self._end_call(pieces, complete=False)
        elif self._state == "content":
            pieces += self._content(self._buffer)
        if not self.calls and self._blank:
            pieces.append(Content(self._blank))
        self._buffer = self._blank = ""
        return pieces

    def _content(self, text: str) -> list[Piece]:
        if self.format == "json":
            return []
        text = self._blank + text
        kept = text.rstrip()
        self._blank = text[len(kept):]
        return [Content(kept)] if kept else []

    def _step(self, pieces: list[Piece]) -> bool:
        """Consume what the buffer allows in the current state; True when the state changed and the rest of
        the buffer must be read in the new one."""
        if self._state == "content":
            at = self._buffer.find(OPEN_TAG)
            if at < 0:
                held = _tag_prefix_length(self._buffer, OPEN_TAG)
                pieces += self._content(self._buffer[: len(self._buffer) - held])
                self._buffer = self._buffer[len(self._buffer) - held:]
                return False
            pieces += self._content(self._buffer[:at])
            self._blank = ""
            self._buffer = self._buffer[at + len(OPEN_TAG):]
            self._start_call(OPEN_TAG)
            return True
        if self._state == "call":
            return self._read_call(pieces)
        if self._state == "close":
            at = self._buffer.find(CLOSE_TAG)
            if at >= 0:
                self._buffer, self._state = self._buffer[at + len(CLOSE_TAG):], "content"
                return True
            rest = self._buffer.lstrip()
            if rest and not CLOSE_TAG.startswith(rest):  # the model went on without closing the tag
                self._buffer, self._state = rest, "content"
                return True
            return False
        # json: `[`, calls separated by `,`, `]`
        while self._buffer:
            char, self._buffer = self._buffer[0], self._buffer[1:]
            if char in " \t\r\n" or char == ",":
                continue
            if self._state == "array":
                self._state = "between"  # the `[`
                continue
            if char == "{":
                self._start_call("")
                self._buffer = char + self._buffer
                return True
        return False

    def _start_call(self, raw: str) -> None:
        self._call, self._raw, self._index, self._dropped = _CallObject(), raw, None, False
        self._state = "call"

    def _read_call(self, pieces: list[Piece]) -> bool:
        call = self._call
        assert call is not None
        for i, char in enumerate(self._buffer):
            call.feed(char)
            self._raw += char
            if call.done or call.broken:
                self._buffer = self._buffer[i + 1:]
                self._end_call(pieces, complete=True)
                return True
        self._buffer = ""
        self._hand_out(pieces)
        return False

    def _hand_out(self, pieces: list[Piece]) -> None:
        """The current call's start once its name is known, then its arguments as they come."""
        call = self._call
        assert call is not None
        if self._index is None and call.name is not None and not call.broken:
            if self.max_calls is not None and self.calls >= self.max_calls:
                self._dropped = True
                return
            self._index, self._raw = self.calls, ""
            self.calls += 1
            pieces.append(CallStart(self._index, new_call_id(), call.name))
        if self._index is not None and call.arguments:
            pieces.append(CallArguments(self._index, "".join(call.arguments)))
            call.arguments.clear()

    def _end_call(self, pieces: list[Piece], complete: bool) -> None:
        """The current call ended (its object closed, it broke, or the output ended inside it)."""
        call = self._call
        assert call is not None
        self._hand_out(pieces)
        if self._index is not None and not call.has_arguments and complete:
            pieces.append(CallArguments(self._index, "{}"))
        elif self._index is None and not self._dropped and self.format == "hermes" and complete:
            pieces += self._content(self._raw)  # not a call after all: what the model wrote is its answer
        self._call = None
        if self.format == "json":
            self._state = "between"
        else:  # a call's closing tag is not content; the text of what was not a call is, all of it
            self._state = "close" if self._index is not None or self._dropped else "content"


def _tag_prefix_length(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
