"""Fixtures for the tiers: tiny seeded models saved as HF directories (with the real
SmolLM2 tokenizer, so text prompts work) and a running stack of real processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import ValkeyProcess, launch
from tests.reference import hf_greedy

PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"


class RunningStack:
    def __init__(self, stack, prefix: str) -> None:
        self.stack, self.prefix = stack, prefix

    @property
    def address(self) -> str:
        return self.stack.coordinator


def start(
    model: str,
    drafter: str,
    valkey: ValkeyProcess,
    targets: int = 1,
    drafts: int = 1,
    extra_env: dict[str, str] | None = None,
) -> RunningStack:
    prefix = f"specdec-test-{uuid.uuid4().hex[:6]}:"
    env = {
        "SPECDEC_REDIS_PREFIX": prefix,
        "SPECDEC_TORCH_THREADS": "1",
        "SPECDEC_HEARTBEAT_S": "0.5",
        **(extra_env or {}),
    }
    stack = launch(model, drafter, drafts, targets, valkey.url, env)
    return RunningStack(stack, prefix)


@pytest.fixture(scope="session")
def tiny_stack(tiny_models: tuple[str, str], valkey: ValkeyProcess) -> Iterator[RunningStack]:
    target, draft = tiny_models
    running = start(target, f"model:{draft}", valkey)
    yield running
    running.stack.stop()


@pytest.fixture(scope="module")
def prompt_ids(tiny_models) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models[0]).encode(PROMPT, add_special_tokens=False)


@pytest.fixture(scope="module")
def reference(tiny_models, prompt_ids) -> list[int]:
    """Plain greedy decoding of the tiny target by transformers: 24 tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32).eval()
    return hf_greedy(model, prompt_ids, 24)


async def ngram_stream(client, prompt_ids: list[int]) -> tuple[list[int], float]:
    """One streamed greedy n-gram generation of 24 tokens -> (token ids, mean verify batch size)."""
    ids, batch = [], 0.0
    async for event in client.generate(
        token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, drafter="ngram", k=3, adaptive=False
    ):
        if event.HasField("chunk"):
            ids.extend(event.chunk.token_ids)
        else:
            batch = event.done.stats.mean_verify_batch_size
    return ids, batch
