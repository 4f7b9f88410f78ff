"""n > 1 choices through the real stack (HTTP front, gRPC tiers, the official `openai`
client): the target computes the prompt's KV rows once and the other choices fork them
(core/kv_fork.py), counted in the target's registry load; each choice equals the n=1
request with its seed (seed + j), greedy and sampled."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator

import pytest

from specdec.launcher import wait_healthy
from specdec.state.registry import Registry
from tests.services.test_http_openai import Front, _coordinator

PROMPT_TOKENS = 200  # under one Redis KV chunk (256): the counts are the forks', not the store's
SPEC = {"ignore_eos": True, "speculation": {"drafter": "ngram", "max_draft_tokens": 3, "adaptive": False}}
HEARTBEAT_S = 0.5  # the tiny stack's SPECDEC_HEARTBEAT_S


@pytest.fixture(scope="module")
def front(tiny_stack, tmp_path_factory) -> Iterator[Front]:
    """A coordinator with the HTTP front on the tiny stack's replicas (room for n=4)."""
    env = {**tiny_stack.stack.env, "SPECDEC_REDIS_PREFIX": tiny_stack.prefix, "SPECDEC_TORCH_THREADS": "1"}
    child, front = _coordinator(tmp_path_factory.mktemp("http-n"), "http-n", env)
    try:
        wait_healthy(child, timeout_s=120)
        yield front
    finally:
        child.proc.terminate()
        child.proc.wait(timeout=30)


async def _target_counts(valkey, prefix: str) -> tuple[int, int]:
    """(prompt rows computed, rows forked) over the target replicas, once the heartbeats
    have caught up (the same figures two beats apart)."""
    registry = Registry(valkey.url, prefix)
    try:
        last = None
        for _ in range(40):
            records = await registry.replicas("target")
            now = tuple(sum(int(r.load.extra.get(k, 0)) for r in records) for k in ("prefill_tokens", "forked_tokens"))
            if now == last:
                return now  # type: ignore[return-value]
            last = now
            await asyncio.sleep(2.5 * HEARTBEAT_S)
        raise AssertionError("the target's load never settled")
    finally:
        await registry.close()


def _prompt() -> list[int]:
    rnd = random.Random(uuid.uuid4().int)  # a prompt no earlier test sent (nothing cached anywhere)
    return [rnd.randrange(1000, 20000) for _ in range(PROMPT_TOKENS)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_n4_computes_the_prompt_once_and_equals_four_n1(front, tiny_stack, valkey, temperature: float):
    client = front.client()
    prompt = _prompt()
    params = dict(model=front.model, prompt=prompt, max_tokens=12, temperature=temperature, seed=31, extra_body=SPEC)
    before = await _target_counts(valkey, tiny_stack.prefix)
    reply = client.completions.create(n=4, **params)
    after = await _target_counts(valkey, tiny_stack.prefix)
    rows = PROMPT_TOKENS - 1  # the newest prompt token is fed with the first drafts
    assert (after[0] - before[0], after[1] - before[1]) == (rows, 3 * rows)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == PROMPT_TOKENS and reply.usage.completion_tokens == 4 * 12
    alone = [client.completions.create(**{**params, "seed": 31 + j}).choices[0].text for j in range(4)]
    assert [c.text for c in reply.choices] == alone
    if temperature:
        assert len(set(alone)) > 1, "four seeds, four samples: the test would prove little otherwise"
    final = await _target_counts(valkey, tiny_stack.prefix)
    assert final[0] - after[0] == 4 * rows  # one after the other, each n=1 request computes its prompt
