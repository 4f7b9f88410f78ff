"""Incremental detokenization with stop strings.

Text is released only once it is final: not while the last character is an incomplete
UTF-8 sequence, and not while it might still become the start of a stop string.

Each step decodes a small window of ids, not the whole output (as vLLM's and TGI's
incremental detokenizers do): `ids[prefix:]` against `ids[prefix:read]`, where `read` is
where the text decoded so far is settled and `prefix` is the settled point before it. The
few ids of context before `read` give the new ids' text as a whole decode would (a word's
leading space, a character split across tokens). The new text settles once the window no
longer ends in an incomplete character ("\\ufffd"); until then it is decoded again with the
next ids. A step costs the window's length, not the output's.
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
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._holdback = max(self._longest - 1, 0)
        # The window: ids from the prefix point on; `_read` of them are settled text.
        self._ids: list[int] = []
        self._read = 0
        self._held = ""  # settled text not yet released (a possible stop string's start)
        self._ahead = 0  # characters released beyond the settled text (before an incomplete one)
        self.text = ""  # all released text

    def add(self, token_ids: list[int], final: bool = False) -> TextDelta:
        body = self._decode_new(token_ids)  # the text after what was released
        # Several stop strings may occur in the new text: stop at the earliest. A stop string
        # may start in released text (at most its length before the end of it).
        back = self.text[max(0, len(self.text) - self._longest) :]
        look = back + body
        hits = [at for stop in self.stop_strings if (at := look.find(stop, max(0, len(back) - len(stop)))) != -1]
        if hits:
            return self._release(look[len(back) : min(hits)], stopped=True)
        if final:
            return self._release(body)
        end = len(body) - self._holdback
        while end > 0 and body[end - 1] == "\ufffd":
            end -= 1
        return self._release(body[: max(end, 0)])

    def _decode_new(self, token_ids: list[int]) -> str:
        """Feed the ids; the decoded text not yet released (its unsettled end may finish
        in incomplete characters)."""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[: self._read])
        window = self._decode(self._ids)
        new = window[len(before) :]
        if len(window) > len(before) and not window.endswith("\ufffd"):  # settled: move the window on
            settled = self._held + new
            released = min(self._ahead, len(settled))
            self._held, self._ahead = settled[released:], self._ahead - released
            del self._ids[: self._read]
            self._read = len(self._ids)
            new = ""
        return self._held + new[self._ahead :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence decodes to one string
        return text

    def _release(self, delta: str, stopped: bool = False) -> TextDelta:
        """Release `delta`, the start of the unreleased text."""
        taken = min(len(delta), len(self._held))
        self._held = self._held[taken:]
        self._ahead += len(delta) - taken
        self.text += delta
        return TextDelta(delta, stopped)
