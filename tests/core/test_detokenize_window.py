"""The windowed incremental detokenizer against a whole decode and against the previous
implementation (which decoded the whole output every step), kept here as the reference:
SmolLM2's real byte-level tokenizer, random token sequences rich in characters split across
tokens (accents, CJK, emoji, lone bytes), special tokens, random step sizes and stop strings."""

from __future__ import annotations

import random

import pytest

from specdec.benchmarks.detok_bench import WholeDecodeDetokenizer
from specdec.core.detokenize import IncrementalDetokenizer

TEXTS = [
    "héllo wörld, ça va? naïve café",
    "你好世界，今天天气很好。我们去公园吧！",
    "🤖👍🏽 emoji 🇫🇷 flags 👨‍👩‍👧 and 😀😃😄",
    "def f(x):\n    return x ** 2  # ∑ ∫ √ ≠ ≤\n\n",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
]


@pytest.fixture(scope="module")
def tokenizer():
    from specdec.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def random_ids(tokenizer, rng: random.Random) -> list[int]:
    """Pieces of real text (multi-byte characters split across tokens), random ids (lone
    bytes of broken characters among them) and special tokens, shuffled together."""
    ids: list[int] = []
    while len(ids) < rng.randrange(1, 80):
        kind = rng.random()
        if kind < 0.6:
            text = rng.choice(TEXTS)
            start = rng.randrange(len(text))
            ids += tokenizer.encode(text[start : start + rng.randrange(1, 20)], add_special_tokens=False)
        elif kind < 0.9:
            ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 4))]
        else:
            ids.append(rng.choice(tokenizer.all_special_ids))
    return ids


def steps_of(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5, 8])
        out.append(ids[i : i + n])
        i += n
    return out


def run(detok, steps: list[list[int]]) -> list[tuple[str, bool]]:
    deltas = []
    for i, step in enumerate(steps):
        delta = detok.add(step, final=i == len(steps) - 1)
        deltas.append((delta.text, delta.stopped))
        if delta.stopped:
            break
    return deltas


def test_deltas_add_up_to_the_whole_decode(tokenizer) -> None:
    rng = random.Random(7)
    split = 0
    for _ in range(400):
        ids = random_ids(tokenizer, rng)
        steps = steps_of(ids, rng)
        deltas = run(IncrementalDetokenizer(tokenizer, []), steps)
        assert "".join(text for text, _ in deltas) == tokenizer.decode(ids, skip_special_tokens=True), ids
        assert deltas == run(WholeDecodeDetokenizer(tokenizer, []), steps), ids
        split += any("\ufffd" in tokenizer.decode(s, skip_special_tokens=True) for s in steps)
    assert split > 100  # many sequences had a character split across steps


def test_stop_strings_cut_where_the_whole_decode_cut_them(tokenizer) -> None:
    rng = random.Random(11)
    stopped = 0
    for _ in range(400):
        ids = random_ids(tokenizer, rng)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stops = []
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(full) + 1)
            stops.append(full[at : at + rng.randrange(1, 6)] or "never here")
        steps = steps_of(ids, rng)
        got = run(IncrementalDetokenizer(tokenizer, stops), steps)
        assert got == run(WholeDecodeDetokenizer(tokenizer, stops), steps), (ids, stops)
        stopped += got[-1][1]
    assert stopped > 200


def test_the_window_stays_small(tokenizer) -> None:
    """A long output decodes a window of a few ids a step, not the whole output."""
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    lengths: list[int] = []

    class Counting:
        def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
            lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), ["zzz"])
    for i in range(len(ids)):
        detok.add(ids[i : i + 1])
    assert len(ids) > 1000 and max(lengths) < 16
    assert detok.text + detok.add([], final=True).text == tokenizer.decode(ids)


class MetaspaceDecoder:
    """Test stub decoding as SentencePiece does: a piece's "▁" is a space, except at the
    start of the decoded sequence, where it is dropped."""

    PIECES = ("▁the", "▁cat", "s", "▁sat", ".", "▁on", "▁a", "▁mat")

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.PIECES[i] for i in token_ids).replace("▁", " ").removeprefix(" ")


def test_new_ids_are_decoded_after_context() -> None:
    """Decoded alone, a new id would lose its leading space: the window's settled ids
    before it keep it."""
    rng = random.Random(3)
    decoder = MetaspaceDecoder()
    for _ in range(50):
        ids = [rng.randrange(len(decoder.PIECES)) for _ in range(rng.randrange(1, 30))]
        steps = steps_of(ids, rng)
        deltas = run(IncrementalDetokenizer(decoder, []), steps)
        assert "".join(text for text, _ in deltas) == decoder.decode(ids)
