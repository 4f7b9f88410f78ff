"""Grammar-aware drafts from the model-free drafters (core/drafters/forced.py): a
constrained session's draft begins with the tokens the grammar forces, keeps the drafter's
own proposal only as far as the grammar allows it, and the grammar state follows the
session incrementally (rejected drafts rolled back). The output stays constrained plain
decoding's, token for token, with every model-free drafter."""

from __future__ import annotations

import json

import pytest

from specdec.core.drafters.worker import DraftWorker
from specdec.core.engine import Engine
from specdec.core.grammar import GrammarState, byte_vocab, vocab_for_tokenizer
from specdec.core.request import RequestSpec
from specdec.core.sampling import SamplingParams
from specdec.core.types import ProposeItem
from tests.structured_schemas import SCHEMAS

PROMPT = [188, 17, 189, 37, 248, 42, 228, 188, 17, 189]
END = 0  # the byte vocabulary's end of text
FREE = ("ngram", "suffix", "suffix-chain")
KEYS = {  # every key forced: the grammar leaves the model only the values to choose
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(target_model, tokenizer) -> Engine:
    target_model.grammar_vocab = byte_vocab(256)  # the tiny models' ids are bytes here
    return Engine(target_model, tokenizer, drafter="ngram")


def spec(drafter: str, source: str, k: int = 6, **kw) -> RequestSpec:
    return RequestSpec(
        token_ids=list(PROMPT),
        max_new_tokens=160,
        stop_token_ids=[END],
        drafter=drafter,
        max_draft_tokens=k,
        adaptive=False,
        grammar_kind="json_schema",
        grammar=source,
        **kw,
    )


def item(tokens: list[int], prefix_len: int, k: int, drafter: str = "ngram", schema=KEYS) -> ProposeItem:
    params = SamplingParams(prompt_len=len(PROMPT), grammar_kind="json_schema", grammar=json.dumps(schema))
    return ProposeItem("s", prefix_len, tokens, k, params, drafter)


@pytest.mark.parametrize("name", ["person", "items", "const", "optional", "nested", "address", "shape"])
def test_greedy_constrained_output_equals_plain_with_every_model_free_drafter(engine, name: str) -> None:
    source = json.dumps(SCHEMAS[name])
    plain = engine.complete(spec("none", source)).token_ids
    assert plain[-1] == END
    for drafter in FREE:
        for k in (1, 4, 12):
            assert engine.complete(spec(drafter, source, k=k)).token_ids == plain, (drafter, k)


def test_a_step_drafts_the_forced_key_and_the_target_accepts_it(engine) -> None:
    """The first draft is the whole forced opening, `{"name":"` (a byte vocabulary: every
    forced byte is a token), then the next step's draft begins with `","age":`-style
    separators once the value ended; the blind drafter proposes nothing of the kind."""
    worker = DraftWorker(grammar_vocab=lambda: byte_vocab(256))
    first = worker.propose_batch([item(list(PROMPT), 0, 12)])[0]
    assert bytes(first.tokens).startswith(b'{"name":"'), bytes(first.tokens)
    blind = DraftWorker(grammar_vocab=lambda: byte_vocab(256))
    blind.grammar_drafts = False
    assert not bytes(blind.propose_batch([item(list(PROMPT), 0, 12)])[0].tokens).startswith(b'{"')
    # The target took `{"name":"ab"` (the drafter's guesses after the key were rejected).
    committed = list(b'{"name":"ab"')
    second = worker.propose_batch([item(committed, len(PROMPT), 12)])[0]
    assert bytes(second.tokens).startswith(b',"age":'), bytes(second.tokens)
    # Through the engine, a one-token-per-step blind run accepts fewer drafts than the guided one.
    source = json.dumps(KEYS)
    guided = engine.complete(spec("ngram", source, k=8))
    engine.drafter.worker.grammar_drafts = False
    try:
        unguided = engine.complete(spec("ngram", source, k=8))
    finally:
        engine.drafter.worker.grammar_drafts = True
    assert guided.token_ids == unguided.token_ids
    forced = len(b'{"name":"') + len(b',"age":')  # at least these are drafted and accepted
    assert guided.stats.accepted_tokens >= forced > unguided.stats.accepted_tokens, (guided.stats, unguided.stats)


def test_the_state_follows_the_session_rolling_back_rejected_drafts() -> None:
    """After each proposal the matcher holds committed tokens + drafts; the next one rolls
    the rejected drafts back and consumes what was committed: the same state as a replay."""
    worker = DraftWorker(grammar_vocab=lambda: byte_vocab(256))
    tokens = list(PROMPT)
    worker.propose_batch([item(tokens, 0, 12)])
    steps = [b'{"na', b'me":"x', b'yz","a', b'ge":4', b"2}"]
    for step in steps:
        known = len(tokens)
        tokens += list(step)
        proposal = worker.propose_batch([item(list(step), known, 5)])[0]
        session = worker.sessions.get("s")
        assert session is not None and session.grammar is not None
        output = tokens[len(PROMPT) :]
        assert session.grammar.consumed == output + proposal.tokens
        replay = GrammarState(byte_vocab(256), "json_schema", json.dumps(KEYS))
        replay.sync(output + proposal.tokens)
        assert (replay.allowed() == session.grammar.allowed()).all()
    assert worker.propose_batch([item([END], len(tokens), 5)])[0].tokens == []  # the text is done


@pytest.mark.parametrize("drafter", FREE)
def test_drafts_the_grammar_forbids_are_cut(drafter: str) -> None:
    """The drafter's own text is proposed only as far as the grammar allows: in the prompt
    `"abcd` goes on with control bytes, which a JSON string cannot hold unescaped."""
    prompt = list(b'xx"abcd\x01\x02\x03 yy')
    tokens = prompt + list(b'{"name":"ab')
    params = SamplingParams(prompt_len=len(prompt), grammar_kind="json_schema", grammar=json.dumps(KEYS))
    proposals = []
    for guided in (True, False):
        worker = DraftWorker(grammar_vocab=lambda: byte_vocab(256))
        worker.grammar_drafts = guided
        proposals.append(worker.propose_batch([ProposeItem("s", 0, tokens, 12, params, drafter)])[0].tokens)
    assert bytes(proposals[0]) == b"cd"
    assert bytes(proposals[1]).startswith(b"cd\x01\x02")


def test_with_a_real_tokenizer_the_forced_key_is_drafted() -> None:
    """A draft replica holding no model takes the grammar vocabulary from the target's
    tokenizer (SmolLM2's, multi-byte tokens): the first draft spells the forced `{"name`."""
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    worker = DraftWorker(grammar_vocab=lambda: vocab_for_tokenizer("smollm2-135m"))
    prompt = tokenizer.encode("A person as JSON:", add_special_tokens=False)
    params = SamplingParams(prompt_len=len(prompt), grammar_kind="json_schema", grammar=json.dumps(KEYS))
    proposal = worker.propose_batch([ProposeItem("s", 0, prompt, 8, params, "ngram")])[0]
    assert tokenizer.decode(proposal.tokens).startswith('{"name'), tokenizer.decode(proposal.tokens)
