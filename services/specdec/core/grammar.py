"""Structured output: a JSON schema, any JSON object, or a regex constrains each token.

The engine is llguidance (PyPI, no dependencies, CPU): a grammar compiles lazily in about
a millisecond, a token mask over a 49k vocabulary takes ~50-200 us, and a matcher rolls
back consumed tokens, which is what speculation needs. (outlines-core builds a whole-vocab
index per schema, ~0.3 s for a small one; xgrammar pulls in triton and tvm-ffi.)

A `GrammarState` follows one session's output tokens. Before each pass it is synced to the
committed output (rolling back what was rejected, consuming what was accepted), then walks
the draft: row j's mask is the grammar's state after the first j drafts, and the first
draft the grammar forbids ends the draft there. The drafts are rolled back afterwards; the
next sync consumes the ones that were committed. The state holds nothing a replay of the
committed tokens cannot rebuild, so a resync or a failover only costs that replay. A
model-free drafter's state (drafters/forced.py) is advanced over the tokens it drafts
(`forced`, `take`) and left there: its next sync rolls back only the rejected ones.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from specdec.core.errors import InvalidArgument

# Compact JSON (no free whitespace): the model cannot spin in whitespace forever.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@functools.lru_cache(maxsize=128)  # a source is at most 64 KiB: the caches stay within a few MB
def compile_grammar(kind: str, source: str) -> str:
    """(kind, source) -> the llguidance grammar text. Raises ValueError on a bad source."""
    from llguidance import LLMatcher

    if kind == "json_object":
        return str(LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS))  # type: ignore[arg-type]  # llguidance's TypedDict
    if kind == "json_schema":
        try:
            schema = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        return str(LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS))  # type: ignore[arg-type]  # llguidance's TypedDict
    if kind == "regex":
        return str(LLMatcher.grammar_from_regex(source))
    raise ValueError(f"unknown constraint kind {kind[:40]!r}")


@functools.lru_cache(maxsize=128)
def check_grammar(kind: str, source: str) -> str:
    """'' when the constraint compiles, else the engine's message. Cached: every tier checks
    every item it receives."""
    from llguidance import LLMatcher

    try:
        return str(LLMatcher.validate_grammar(compile_grammar(kind, source), None))
    except ValueError as exc:
        return str(exc)


class _ByteTokens:
    """A vocabulary whose token i is the byte i (token 0, NUL, doubles as end of text)."""

    eos_token_id = 0
    bos_token_id = None

    def __init__(self, size: int) -> None:
        self.special_token_ids = [0]
        self.tokens = [bytes([i]) for i in range(min(size, 256))] + [b""] * max(0, size - 256)

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def byte_vocab(size: int = 256) -> Any:
    """A grammar vocabulary for models whose token ids are bytes (the tiny test models)."""
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_ByteTokens(size)), n_vocab=size)


_VOCABS: dict[int, tuple[object, Any]] = {}  # id(model) -> (model, its grammar vocabulary): built once


def vocab_for_model(model: object, vocab_size: int) -> Any:
    """The grammar vocabulary of a loaded model: `model.grammar_vocab` when set, else the
    tokenizer saved with it (config._name_or_path); None when it has none."""
    cached = _VOCABS.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    vocab = getattr(model, "grammar_vocab", None)
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if vocab is None and path:
        import llguidance.hf
        from transformers import AutoTokenizer

        tokenizer: Any = AutoTokenizer.from_pretrained(path)
        vocab = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    _VOCABS[id(model)] = (model, vocab)
    return vocab


class GrammarState:
    """One session's grammar matcher and the output tokens it has consumed."""

    def __init__(self, vocab: Any, kind: str, source: str) -> None:
        from llguidance import LLMatcher

        self.key = (kind, source)
        self.vocab = vocab
        self.matcher = LLMatcher(vocab, compile_grammar(kind, source), log_level=0)
        self.consumed: list[int] = []  # output tokens the matcher took (none after it stopped)
        self.vocab_size = int(vocab.vocab_size)

    def sync(self, output: Sequence[int]) -> None:
        """Bring the matcher to `output` (the session's committed tokens after the prompt):
        roll back what diverges, consume what is new. Tokens after the grammar stopped
        (end of text) are not the grammar's."""
        same = 0
        for a, b in zip(self.consumed, output):
            if a != b:
                break
            same += 1
        if same < len(self.consumed):
            if not self.matcher.rollback(len(self.consumed) - same):
                raise InvalidArgument("tokens", "the constraint's state cannot be rolled back")
            del self.consumed[same:]
        for token in output[len(self.consumed) :]:
            if self.matcher.is_stopped():
                break
            if not self.matcher.consume_token(token):
                raise InvalidArgument("tokens", "committed tokens violate the request's constraint")
            self.consumed.append(token)

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next (end of text once it is done)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    def walk(self, drafts: Sequence[int]) -> tuple[np.ndarray, int]:
        """(allowed [m + 1, vocab], m): masks for the rows after each of the first m drafts,
        m being the leading drafts the grammar allows. The matcher is left where it was."""
        rows = [self.allowed()]
        taken = 0
        for token in drafts:
            if self.matcher.is_stopped() or not (0 <= token < self.vocab_size and rows[-1][token]):
                break
            if not self.matcher.consume_token(token):
                break
            taken += 1
            rows.append(self.allowed())
        if taken and not self.matcher.rollback(taken):
            raise InvalidArgument("draft_tokens", "the constraint's state cannot be rolled back")
        return np.stack(rows), taken

    def advance(self, token: int) -> None:
        """Take a token the caller sampled from a masked row (a drafter's own draft)."""
        if not self.matcher.is_stopped() and self.matcher.consume_token(token):
            self.consumed.append(token)

    def take(self, tokens: Sequence[int]) -> list[int]:
        """Consume the leading `tokens` the grammar allows (a draft, cut at its first
        forbidden token, which leaves the matcher as it was, not in error); those taken."""
        if self.matcher.is_stopped():
            return []
        valid = 0  # an id past the grammar's vocabulary ends the run (llguidance would reject the call)
        while valid < len(tokens) and 0 <= tokens[valid] < self.vocab_size:
            valid += 1
        taken = list(tokens[: self.matcher.try_consume_tokens(list(tokens[:valid]))]) if valid else []
        self.consumed.extend(taken)
        return taken

    def forced(self) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens: it stops
        before a token that the text after the forced bytes could merge with)."""
        return [] if self.matcher.is_stopped() else list(self.matcher.compute_ff_tokens())

    def forced_text_tokens(self) -> list[int]:
        """The forced bytes left after `forced()`, tokenized alone: right unless the model
        merges their last token with the free text after it (a draft, the target judges)."""
        if self.matcher.is_stopped():
            return []
        forced = self.matcher.compute_ff_bytes()
        return list(self.vocab.tokenize_bytes(forced)) if forced else []


def grammar_state(
    current: GrammarState | None, vocab: Any, kind: str, source: str, output: Sequence[int]
) -> GrammarState:
    """The session's state for this constraint, synced to its committed `output`; a new one
    (replaying the output) when the session had none or another constraint."""
    if vocab is None:
        raise InvalidArgument("sampling.constraint", "this tier's model has no tokenizer for structured output")
    state = current if current is not None and current.key == (kind, source) else GrammarState(vocab, kind, source)
    state.sync(output)
    return state


def vocab_for_tokenizer(name: str) -> Any:
    """The grammar vocabulary of model `name`'s tokenizer alone (a draft replica that holds
    no model but drafts for that target)."""
    import llguidance.hf

    from specdec.core.models import load_tokenizer

    tokenizer: Any = load_tokenizer(name)
    return llguidance.hf.from_tokenizer(tokenizer)


def mask_logits(logits: torch.Tensor, allowed: np.ndarray) -> torch.Tensor:
    """Forbidden tokens to -inf; a row the grammar leaves empty (it errored) stays as is
    rather than turning into NaNs. Columns past the grammar's vocabulary are forbidden."""
    width = logits.shape[-1]
    keep = np.zeros((allowed.shape[0], width), dtype=bool)
    keep[:, : min(width, allowed.shape[1])] = allowed[:, :width]
    keep[~keep.any(axis=1)] = True
    return logits.masked_fill(torch.from_numpy(~keep).to(logits.device), -torch.inf)
