from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from slimserve.server.detokenize import IncrementalDetokenizer
from tests.tiny import tiny_tokenizer

TOKENIZER: PreTrainedTokenizerFast = tiny_tokenizer()


def _feed(text: str, stop: list[str]) -> tuple[list[str], bool, str]:
    ids = TOKENIZER.encode(text)
    detok = IncrementalDetokenizer(TOKENIZER, prompt_ids=[], stop=stop)
    pieces, stopped = [], False
    for token in ids:
        delta = detok.add(token)
        pieces.append(delta.text)
        if delta.stopped:
            stopped = True
            break
    return pieces, stopped, detok.flush()


def test_incremental_text_equals_full_decode() -> None:
    text = "héllo wörld 😀 The capital of France is Paris."
    pieces, stopped, rest = _feed(text, stop=[])
    assert not stopped
    assert "".join(pieces) + rest == TOKENIZER.decode(TOKENIZER.encode(text))


def test_multibyte_character_is_never_split() -> None:
    pieces, _, rest = _feed("😀😀", stop=[])
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + rest == "😀😀"


def test_stop_string_truncates_and_finishes() -> None:
    pieces, stopped, _ = _feed("one two three four five", stop=["three"])
    assert stopped
    assert "".join(pieces) == "one two "


def test_stream_never_shows_text_that_becomes_a_stop_match() -> None:
    # every emitted prefix must be free of any beginning of the stop string that later completes
    pieces, stopped, _ = _feed("abc STOP here", stop=[" STOP"])
    assert stopped
    shown = ""
    for piece in pieces:
        shown += piece
        assert " STOP" not in shown and not shown.endswith(" ")
    assert shown == "abc"


def test_held_prefix_is_released_when_it_does_not_match() -> None:
    pieces, stopped, rest = _feed("the cap is red", stop=["capital"])
    assert not stopped
    assert "".join(pieces) + rest == "the cap is red"
