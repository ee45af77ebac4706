"""Turning generated token ids into text deltas, holding back anything that may become a stop match.

A streamed client must never see text that a later token turns into a stop sequence, so text that ends
with a prefix of any stop string is held until the next token settles it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TextDelta:
    text: str
    stopped: bool
    """True when a stop string matched: `text` ends just before it, and the sequence is done."""


class IncrementalDetokenizer:
    """Decodes one sequence token by token, vLLM-style: only a short window is re-decoded each step.

    A window is decoded twice (with and without the newest tokens) so that multi-token characters and
    tokenizers that merge spaces come out right; output that ends in U+FFFD waits for more bytes.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = [s for s in stop if s]
        self._held = ""

    def add(self, token_id: int) -> TextDelta:
        """Feed one generated token; return the text that is now safe to show."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            new_text = ""
        else:
            new_text = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release(new_text)

    def flush(self) -> str:
        """Everything still held, for a sequence that ended without a stop match."""
        held, self._held = self._held, ""
        return held

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _release(self, new_text: str) -> TextDelta:
        buffer = self._held + new_text
        if not self.stop:
            self._held = ""
            return TextDelta(buffer, stopped=False)
        match = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if match >= 0:
            self._held = ""
            return TextDelta(buffer[:match], stopped=True)
        hold = _longest_stop_prefix_suffix(buffer, self.stop)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return TextDelta(buffer[: len(buffer) - hold], stopped=False)


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best
