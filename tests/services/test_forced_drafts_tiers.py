"""Grammar-aware model-free drafts through the three tiers (real processes, a draft tier
with no model: its grammar vocabulary is the target's tokenizer, SPECDEC_MODEL's): greedy
constrained output equals in-process constrained plain decoding with ngram and suffix, and
the draft tier drafts under the grammar as the in-process engine does (same counts)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from specdec.client import Client
from tests.services.conftest import RunningStack, start
from tests.structured_schemas import SCHEMAS

NAMES = ["person", "items", "const", "nested"]


@pytest.fixture(scope="module")
def ngram_stack(tiny_models, valkey) -> Iterator[RunningStack]:
    running = start(tiny_models[0], "ngram", valkey)
    yield running
    running.stack.stop()


@pytest.fixture(scope="module")
def engine(tiny_models):
    from specdec.core.engine import Engine

    return Engine.load(tiny_models[0], "ngram")


def _local(engine, prompt_ids: list[int], **params):
    from specdec.core.request import RequestSpec

    return engine.complete(RequestSpec(token_ids=prompt_ids, max_draft_tokens=6, adaptive=False, **params))


def test_constrained_output_through_a_model_free_draft_tier_equals_plain(ngram_stack, prompt_ids, engine) -> None:
    for name in NAMES:
        schema, source = SCHEMAS[name], json.dumps(SCHEMAS[name])
        common = {"max_new_tokens": 120, "grammar_kind": "json_schema", "grammar": source}
        plain = _local(engine, prompt_ids, drafter="none", **common)
        guided = _local(engine, prompt_ids, drafter="ngram", **common)
        assert guided.token_ids == plain.token_ids
        with Client(ngram_stack.address, timeout_s=120) as client:
            for drafter in ("ngram", "suffix", "suffix-chain"):
                remote = client.complete(
                    token_ids=prompt_ids, drafter=drafter, k=6, adaptive=False, max_new_tokens=120, json_schema=schema
                )
                assert list(remote.token_ids) == plain.token_ids, (name, drafter)
                if drafter == "ngram":  # drafted under the grammar at the draft tier, as in-process
                    assert remote.stats.accepted_tokens == guided.stats.accepted_tokens > 0, name
