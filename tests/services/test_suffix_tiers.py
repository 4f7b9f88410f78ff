"""The suffix drafter through the three tiers (real processes, gRPC, Valkey): greedy output
identical to plain decoding at every draft length, and the draft replica's shared stream
drafting a repeated request from the first one's output."""

from __future__ import annotations

from typing import Any

from specdec.client import Client
from tests.services.conftest import RunningStack


def complete(client: Client, prompt_ids: list[int], **params: Any) -> tuple[list[int], Any]:
    reply = client.complete(token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, adaptive=False, **params)
    return list(reply.token_ids), reply.stats


def test_suffix_greedy_identical_to_plain_decoding(
    tiny_stack: RunningStack, prompt_ids: list[int], reference: list[int]
) -> None:
    with Client(tiny_stack.address, timeout_s=120) as client:
        proposed = accepted = 0
        for k in range(1, 9):
            ids, stats = complete(client, prompt_ids, drafter="suffix", k=k)
            assert ids == reference, f"suffix k={k}"
            proposed += stats.proposed_tokens
            accepted += stats.accepted_tokens
        assert proposed > accepted > 0  # both acceptance and rejection exercised
        # By now the draft replica's shared stream holds this prompt's output: a request
        # with the same prompt is drafted from it and most drafts are accepted.
        ids, stats = complete(client, prompt_ids, drafter="suffix", k=8)
        assert ids == reference
        assert stats.accepted_tokens >= 18 and stats.steps <= 6, stats  # 4+ tokens a step (plain: 24 steps)
