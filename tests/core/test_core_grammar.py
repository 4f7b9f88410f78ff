"""Structured output exact under speculation, on the tiny models with a byte vocabulary
(token i is byte i, token 0 ends the text): the constraint masks the target's rows and the
model drafter's proposals, so greedy output equals constrained plain decoding token for
token with every drafter, sampled output follows its distribution, and every output
parses and validates against its schema (the random models leave all the work to it)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import jsonschema
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from tiny_models import run

from specdec.core.engine import Engine
from specdec.core.errors import InvalidArgument
from specdec.core.grammar import GrammarState, byte_vocab, mask_logits
from specdec.core.request import RequestSpec
from specdec.core.sampling import SamplingParams, probs_from_logits
from tests.reference import contingency
from tests.structured_schemas import SCHEMAS

PROMPT = [188, 17, 189, 37, 248, 42, 228, 188, 17, 189]
END = 0  # the byte vocabulary's end of text
DRAFTERS = ("none", "ngram", "model:small")


@pytest.fixture(scope="module")
def engine(target_model, draft_model, tokenizer) -> Engine:
    vocab = byte_vocab(256)
    target_model.grammar_vocab = vocab  # the models' ids are bytes for these tests
    draft_model.grammar_vocab = vocab
    return Engine(target_model, tokenizer, drafter="ngram", draft_model=draft_model, draft_model_name="small")


def spec(drafter: str, kind: str, source: str, seed: int = 0, max_new_tokens: int = 160, **kw) -> RequestSpec:
    return RequestSpec(
        token_ids=list(PROMPT),
        max_new_tokens=max_new_tokens,
        stop_token_ids=[END],
        drafter=drafter,
        max_draft_tokens=kw.pop("k", 4),
        adaptive=False,
        seed=seed,
        grammar_kind=kind,
        grammar=source,
        **kw,
    )


def text_of(tokens: list[int]) -> str:
    assert tokens and tokens[-1] == END, f"the constraint did not finish the text: {bytes(tokens)[-40:]!r}"
    return bytes(tokens[:-1]).decode("utf-8")


def complete_all(engine: Engine, specs: list[RequestSpec]):
    async def main():
        return await asyncio.gather(*[engine.complete_async(s) for s in specs])

    return run(main())


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_validates_and_greedy_speculation_equals_plain(engine, name: str) -> None:
    schema = SCHEMAS[name]
    source = json.dumps(schema)
    plain = engine.complete(spec("none", "json_schema", source)).token_ids
    jsonschema.validate(json.loads(text_of(plain)), schema)
    for drafter in DRAFTERS[1:]:
        assert engine.complete(spec(drafter, "json_schema", source)).token_ids == plain, drafter
    sampled = complete_all(
        engine,
        [spec(d, "json_schema", source, seed=s, temperature=1.0) for d in DRAFTERS for s in range(3)],
    )
    for result in sampled:
        jsonschema.validate(json.loads(text_of(result.token_ids)), schema)


def test_json_object_and_regex(engine) -> None:
    for drafter in DRAFTERS:
        out = engine.complete(spec(drafter, "regex", "[a-h]{3}-(yes|no)", temperature=1.0, seed=3)).token_ids
        text = text_of(out)
        assert len(text) in (6, 7) and text[3] == "-" and text[4:] in ("yes", "no"), text
    # Any JSON object: unbounded, so a sampled random model may run long; greedy ends.
    obj = engine.complete(spec("model:small", "json_object", "", max_new_tokens=400)).token_ids
    assert isinstance(json.loads(text_of(obj)), dict)


def test_speculation_accepts_drafts_under_the_constraint(engine) -> None:
    source = json.dumps(SCHEMAS["items"])
    result = engine.complete(spec("model:small", "json_schema", source))
    assert result.stats.accepted_tokens > 0 and result.stats.proposed_tokens > result.stats.accepted_tokens


SEEDS = range(240)
REGEX = "[a-p]{2}(x|yz)"


@pytest.fixture(scope="module")
def samples(engine) -> dict[str, list[list[int]]]:
    out = {}
    for drafter in DRAFTERS:
        results = complete_all(engine, [spec(drafter, "regex", REGEX, seed=s, temperature=1.0) for s in SEEDS])
        out[drafter] = [r.token_ids for r in results]
    return out


def test_first_token_follows_the_masked_target(samples, target_model) -> None:
    with torch.inference_mode():
        logits = target_model(input_ids=torch.tensor([PROMPT])).logits[0, -1:]
    state = GrammarState(byte_vocab(256), "regex", REGEX)
    p = probs_from_logits(mask_logits(logits, state.allowed()[None, :]), SamplingParams(temperature=1.0))[0]
    support = [int(t) for t in torch.nonzero(p > 0).flatten()]
    assert [chr(t) for t in support] == list("abcdefghijklmnop")
    for drafter, tokens in samples.items():
        counts = Counter(t[0] for t in tokens)
        expected = [float(p[t]) * len(tokens) for t in support]
        assert chisquare([counts[t] for t in support], expected).pvalue > 1e-3, drafter


@pytest.mark.parametrize("drafter", DRAFTERS[1:])
@pytest.mark.parametrize("position", [1, 2, 3])
def test_later_positions_match_constrained_plain_sampling(samples, drafter: str, position: int) -> None:
    rows = contingency([t[position] for t in samples["none"]], [t[position] for t in samples[drafter]])
    assert len(rows[0]) >= 2
    assert chi2_contingency(rows).pvalue > 1e-3


def test_state_replays_and_rolls_back_to_any_committed_output() -> None:
    """What a resync or a failover does: the state follows whatever the session committed."""
    state = GrammarState(byte_vocab(256), "json_schema", json.dumps(SCHEMAS["person"]))
    text = list(b'{"name":"ab","age":7}')
    state.sync(text[:12])  # {"name":"ab"
    masks, taken = state.walk(text[12:17])
    assert taken == 5 and masks.shape == (6, 256) and state.consumed == text[:12]
    masks, taken = state.walk([*b",!", *text[14:16]])
    assert taken == 1 and masks.shape == (2, 256)  # a forbidden draft ends the draft there
    state.sync(text[:4])  # rolled back
    state.sync(text)
    assert state.matcher.is_accepting()
    fresh = GrammarState(byte_vocab(256), "json_schema", json.dumps(SCHEMAS["person"]))
    fresh.sync(text)
    assert (fresh.allowed() == state.allowed()).all()
    with pytest.raises(InvalidArgument):
        GrammarState(byte_vocab(256), "regex", "a+").sync(list(b"ab"))


@pytest.mark.parametrize(
    ("kind", "source"),
    [("json_schema", "{not json"), ("json_schema", '{"type": "nonsense"}'), ("regex", "a(b"), ("xml", "")],
)
def test_bad_constraints_name_the_field(engine, kind: str, source: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        engine.complete(spec("none", kind, source))
    assert err.value.field.startswith("decoding.constraint"), err.value.field
