"""TextStream, the API's incremental detokenizer, against the real byte-level BPE tokenizer of a test checkpoint.

The reference is what a whole decode gives: tokenizer.decode(all ids, skip_special_tokens=True), cut at the
first stop string. Token ids are drawn as encoded text (multi-byte characters split over tokens), any id of
the vocabulary (special tokens, lone bytes of a multi-byte character, invalid UTF-8) and ids past it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from faasmoe.model.tokenizer import IM_END, IM_START
from faasmoe.server.generation import TextStream

REPLACEMENT_CHAR = "\ufffd"  # a decoder's stand-in for an invalid or incomplete UTF-8 sequence


@pytest.fixture(scope="module")
def tokenizer(tiny_fp32: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_fp32)


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def cut_at_first_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def stream(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    """The pieces a request's deltas carry: add() per token, flush() at the end unless it stopped."""
    text, pieces = TextStream(tokenizer, stop), []
    for token_id in ids:
        pieces.append(text.add(token_id))
        if text.stopped:
            return pieces, True
    pieces.append(text.flush())
    return pieces, text.stopped


# Short runs of characters that byte-level BPE splits into several tokens each, and plain ASCII.
characters = st.one_of(st.sampled_from(list("ab c,.\n") + ["é", "中", "😀", "€"]), st.characters(codec="utf-8"))
texts = st.text(characters, max_size=12)


def segments(vocab_size: int) -> st.SearchStrategy[list[int] | str]:
    """A text to encode, or one id: any of the vocabulary's, a special token, or one past the vocabulary."""
    return st.one_of(texts, st.lists(st.integers(0, vocab_size + 2), min_size=1, max_size=3))


def token_ids(tokenizer: PreTrainedTokenizerBase, parts: list[list[int] | str]) -> list[int]:
    return [i for part in parts for i in (tokenizer.encode(part) if isinstance(part, str) else part)]


@st.composite
def stop_strings(draw: st.DrawFn, text: str) -> list[str]:
    """Up to 3 stop strings: pieces of the text (so they occur, often across tokens) and texts of their own."""
    pieces = [text[a:b] for a in range(len(text)) for b in range(a + 1, min(a + 6, len(text)) + 1)]
    one = st.one_of(st.sampled_from(pieces), texts.filter(bool)) if pieces else texts.filter(bool)
    return draw(st.lists(one, max_size=3))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pieces_concatenate_to_the_whole_decode_cut_at_the_first_stop_string(tokenizer, data):
    ids = token_ids(tokenizer, data.draw(st.lists(segments(len(tokenizer)), max_size=12)))
    whole = decode(tokenizer, ids)
    stop = data.draw(stop_strings(whole))
    pieces, stopped = stream(tokenizer, ids, stop)
    out = "".join(pieces)

    nested = any(a != b and a in b for a in stop for b in stop)
    if not nested:
        assert (out, stopped) == cut_at_first_stop(whole, stop)
    else:  # streaming cuts at the first stop string to complete; one inside another may complete first
        assert whole.startswith(out)
        assert stopped == any(s in whole for s in stop)
        assert not any(s in out for s in stop)
        assert not stopped or any(whole.startswith(s, len(out)) for s in stop)
    # Nothing handed out is taken back or changed later: every running concatenation is a prefix.
    assert all(whole.startswith("".join(pieces[:n])) for n in range(len(pieces)))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_text_is_held_back_only_while_it_may_become_a_stop_string_or_a_character(tokenizer, data):
    """After each token the stream has handed out the decode so far, less (longest stop - 1) characters,
    unless the decode ends in an incomplete character; and it stops as soon as a stop string is decoded."""
    ids = token_ids(tokenizer, data.draw(st.lists(segments(len(tokenizer)), max_size=10)))
    stop = data.draw(stop_strings(decode(tokenizer, ids)))
    hold = max((len(s) for s in stop), default=1) - 1
    text, out = TextStream(tokenizer, stop), ""
    for n in range(1, len(ids) + 1):
        out += text.add(ids[n - 1])
        so_far = decode(tokenizer, ids[:n])
        if text.stopped:
            assert any(s in so_far for s in stop)
            return
        if not so_far.endswith(REPLACEMENT_CHAR):
            assert not any(s in so_far for s in stop)
            assert out == so_far[: max(len(so_far) - hold, 0)]


@settings(max_examples=100, deadline=None)
@given(st.text(characters, max_size=30))
def test_no_piece_holds_part_of_a_character(tokenizer, text):
    pieces, _ = stream(tokenizer, tokenizer.encode(text), [])
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_a_character_split_over_tokens_comes_whole_with_its_last_token(tokenizer):
    ids = tokenizer.encode("a😀")
    assert len(ids) > 2  # the emoji's four bytes span several tokens of this vocabulary
    pieces, _ = stream(tokenizer, ids, [])
    assert pieces == ["a", *[""] * (len(ids) - 2), "😀", ""]


def test_an_incomplete_character_at_the_end_is_flushed_as_the_decode_gives_it(tokenizer):
    ids = [*tokenizer.encode("ok"), *tokenizer.encode("😀")[:-1]]
    pieces, stopped = stream(tokenizer, ids, ["zz"])
    assert "".join(pieces) == "ok" + REPLACEMENT_CHAR == decode(tokenizer, ids)
    assert pieces[-1].endswith(REPLACEMENT_CHAR) and not stopped  # only flush() hands out the partial emoji


def test_a_stop_string_ending_in_a_character_split_over_tokens_leaks_none_of_itself(tokenizer):
    """While the last character is incomplete, its U+FFFD is no character to hold back a stop string with."""
    ids = tokenizer.encode("000000000\x80")  # U+0080 is two bytes: two tokens here
    assert decode(tokenizer, ids[:-1]).endswith(REPLACEMENT_CHAR)
    pieces, stopped = stream(tokenizer, ids, ["00000\x80"])
    assert stopped and "".join(pieces) == "0000"


def test_stop_string_across_tokens_cuts_the_text(tokenizer):
    ids = tokenizer.encode("hello wonderful world")
    pieces, stopped = stream(tokenizer, ids, ["nder", "o wo"])
    assert stopped and "".join(pieces) == "hell"
    assert len(pieces) < len(ids)  # it stopped at the token that completed "o wo", not at the end


def test_special_tokens_are_skipped_and_never_match_a_stop_string(tokenizer):
    special = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    ids = [special[0], *tokenizer.encode("hi"), special[1], tokenizer.eos_token_id, *tokenizer.encode(" there")]
    pieces, stopped = stream(tokenizer, ids, [IM_END, "<|"])
    assert "".join(pieces) == "hi there" and not stopped
