"""Incremental detokenization and stop-sequence hold-back, with the demo model's real tokenizer."""

from __future__ import annotations

import pytest

from llm_endpoint.backends.text import StopSequenceFilter, TextAssembler

SAMPLES = [
    "The capital of France is Paris.",
    "  leading spaces and\ttabs\nnew lines",
    "Multi-byte: café, naïve, 東京, emoji 🚀🎉 and 🇫🇷 flags",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_of_increments_equals_full_decode(tokenizer, text: str) -> None:
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    asm = TextAssembler(tokenizer, prompt)
    pieces = [asm.add(i)[0] for i in ids]
    pieces.append(asm.finish())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_character_split_over_tokens_is_released_whole(tokenizer) -> None:
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the rocket emoji should need several byte-level tokens"
    asm = TextAssembler(tokenizer, [])
    pieces = [asm.add(i)[0] for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🚀"


def test_stop_sequence_spanning_tokens_never_leaks(tokenizer) -> None:
    text = "The answer is forty two, my friend."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    asm = TextAssembler(tokenizer, [], stop_sequences=["forty two"])
    released, stopped_at = [], None
    for n, i in enumerate(ids):
        piece, stopped = asm.add(i)
        released.append(piece)
        if stopped:
            stopped_at = n
            break
    assert stopped_at is not None
    assert "".join(released) == "The answer is "
    assert not any("forty" in p for p in released)


def test_special_tokens_add_no_text(tokenizer) -> None:
    asm = TextAssembler(tokenizer, [])
    assert asm.add(tokenizer.eos_token_id) == ("", False)


def test_filter_holds_back_only_possible_prefixes() -> None:
    f = StopSequenceFilter(["STOP", "halt"])
    assert f.push("abc ST") == ("abc ", False)
    assert f.push("AR") == ("STAR", False)
    assert f.push(" ha") == (" ", False)
    assert f.push("lt now") == ("", True)
    assert f.flush() == ""


def test_filter_earliest_stop_wins() -> None:
    f = StopSequenceFilter(["world", "lo w"])
    assert f.push("hello world") == ("hel", True)
