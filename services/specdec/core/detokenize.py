"""Incremental detokenization with stop strings.

Text is released only once it is final: not while the last character is an incomplete
UTF-8 sequence, and not while it might still become the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.core.tokenizer import Decoder


@dataclass
class TextDelta:
    text: str  # newly final text
    stopped: bool = False  # a stop string was found; text ends before it


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self._holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already released
        self.text = ""  # all released text

    def add(self, token_ids: list[int], final: bool = False) -> TextDelta:
        self._ids.extend(token_ids)
        full = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        assert isinstance(full, str)  # one sequence decodes to one string
        # Several stop strings may occur in the new text: stop at the earliest.
        hits = [at for stop in self.stop_strings if (at := full.find(stop, max(0, self._emitted - len(stop)))) != -1]
        if hits:
            return self._release(full[: min(hits)], stopped=True)
        if final:
            return self._release(full)
        end = len(full) - self._holdback
        while end > self._emitted and full[end - 1] == "\ufffd":
            end -= 1
        return self._release(full[: max(end, self._emitted)])

    def _release(self, upto: str, stopped: bool = False) -> TextDelta:
        delta = upto[self._emitted :]
        self._emitted = max(self._emitted, len(upto))
        self.text += delta
        return TextDelta(delta, stopped)
