"""Structured output on our engine: a JSON schema becomes a token-level matcher (llguidance) that says, before
each token is drawn, which tokens may come next, and follows the tokens the request actually generates.

llguidance rather than xgrammar: it is a 7.6 MB wheel with no dependencies, while xgrammar requires triton
(about 1 GB, GPU compilers) on x86-64 Linux; both compile JSON schemas to the same kind of token mask.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
import torch

if TYPE_CHECKING:  # a TypedDict of llguidance's type stubs only
    from llguidance._lib import JsonCompileOptions

DEFAULT_CACHE_SIZE = 64  # compiled schemas kept; a request with another schema compiles its own
# Compact JSON: the grammar admits no whitespace between tokens of the JSON text. With whitespace allowed, a
# small model can spend its whole budget on newlines inside an object (seen with the 135M demo model).
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


class GrammarError(Exception):
    """The schema cannot be compiled, or the request's matcher failed; the message says why."""


class Constraint:
    """One sequence's matcher: the tokens allowed next, advanced by each token the sequence takes."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool: True where a token may come next (bits past the tokenizer's vocabulary are 0)."""
        self._check()
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: self._vocab_size]
        if not bits.any():
            raise GrammarError("the grammar allows no next token")
        return torch.from_numpy(bits.astype(np.bool_))

    def accept(self, token_id: int) -> None:
        """Advance past the token the sequence took; a token the grammar did not allow is an error."""
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} does not fit the grammar: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Whether the output is a whole match and nothing more may follow (only the end of the text)."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())


class Grammars:
    """The engine's grammar compiler: llguidance's view of the tokenizer, built on first use (~0.3 s), and a
    bounded cache of compiled schemas, each request getting its own copy. Thread-safe: requests compile off
    the engine thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """`vocab_size`: the width of the model's logits, which may exceed the tokenizer's vocabulary."""
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def constraint(self, schema: str) -> Constraint:
        """A fresh matcher for JSON text matching `schema` (canonical JSON text)."""
        with self._lock:
            compiled = self._compiled.get(schema)
            if compiled is None:
                compiled = self._compile(schema)
                self._compiled[schema] = compiled
                if len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(schema)
            return Constraint(compiled.deep_copy(), self._vocab_size)

    def _compile(self, schema: str) -> llguidance.LLMatcher:
        if self._llg_tokenizer is None:
            try:
                self._llg_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_ids)
            except Exception as exc:  # e.g. a slow (Python) tokenizer, which llguidance cannot read
                raise GrammarError(f"structured output cannot use this model's tokenizer: {exc}") from None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher
