"""Fixtures for the tiers: tiny seeded models saved as HF directories (with the real
SmolLM2 tokenizer, so text prompts work) and a running stack of real processes."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import ValkeyProcess, free_port


class RunningStack:
    def __init__(self, stack, prefix: str) -> None:
        self.stack, self.prefix = stack, prefix

    @property
    def address(self) -> str:
        return self.stack.coordinator


def start(model: str, drafter: str, valkey: ValkeyProcess, targets: int = 1, drafts: int = 1) -> RunningStack:
    from specdec.launcher import start_stack

    prefix = f"specdec-test-{uuid.uuid4().hex[:6]}:"
    os.environ["SPECDEC_REDIS_PREFIX"] = prefix  # the launcher's registry wait reads it too
    env = {"SPECDEC_REDIS_PREFIX": prefix, "SPECDEC_TORCH_THREADS": "1", "SPECDEC_HEARTBEAT_S": "0.5"}
    stack = start_stack(model, drafter, drafts, targets, free_port(), valkey.url, extra_env=env)
    return RunningStack(stack, prefix)


@pytest.fixture(scope="session")
def tiny_stack(tiny_models: tuple[str, str], valkey: ValkeyProcess) -> Iterator[RunningStack]:
    target, draft = tiny_models
    running = start(target, f"model:{draft}", valkey)
    yield running
    running.stack.stop()
