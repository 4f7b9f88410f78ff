"""Fixtures for the Redis KV tier: tiny seeded llamas with a long context (1,000+ token
prefixes), a wider one whose prefill costs something (time-to-first-token figures), and
helpers to run a stack of real processes and add replicas to it."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from tests import llama_dirs
from tests.conftest import ValkeyProcess, free_port


def save_llama(path: Path, tokenizer, seed: int, layers: int, **kw) -> Path:
    """The shared tiny llama with a context long enough for 1,000+ token prefixes."""
    return llama_dirs.save_llama(path, tokenizer, seed, layers, max_positions=4096, **kw)


@pytest.fixture(scope="session")
def kv_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("kvmodels")
    target = save_llama(root / "target", tokenizer, seed=0, layers=2)
    draft = save_llama(root / "draft", tokenizer, seed=1, layers=1, init_from=target)
    return {"target": str(target), "draft": str(draft)}


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Prefill of 1,000 tokens costs a few hundred ms on one thread: TTFT differences show."""
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    return str(save_llama(tmp_path_factory.mktemp("wide") / "m", tokenizer, seed=3, layers=6, hidden=256,
                          heads=8, kv_heads=4))


def start(model: str, drafter: str, valkey: ValkeyProcess, targets: int, drafts: int, **env: str):
    """A stack of real processes (own key prefix) on the shared Valkey."""
    from specdec.launcher import start_stack

    prefix = f"specdec-kv-{uuid.uuid4().hex[:6]}:"
    os.environ["SPECDEC_REDIS_PREFIX"] = prefix  # the launcher's registry wait reads it too
    extra = {"SPECDEC_REDIS_PREFIX": prefix, "SPECDEC_TORCH_THREADS": "1", "SPECDEC_HEARTBEAT_S": "0.5",
             "SPECDEC_DRAIN_TIMEOUT_S": "5", **env}
    stack = start_stack(model, drafter, drafts, targets, free_port(), valkey.url, extra_env=extra)
    stack.prefix = prefix  # type: ignore[attr-defined]
    return stack


def add_replica(stack, tier: str, name: str):
    """Start one more replica of `tier` with the stack's settings; wait until it is healthy."""
    from specdec.launcher import wait_healthy

    port = free_port()
    child = stack.spawn(name, [sys.executable, "-m", "specdec.cli", "serve", tier, "--port", str(port)],
                        stack.env, f"127.0.0.1:{port}")
    wait_healthy(child)
    return child


def child(stack, name: str):
    return next(c for c in stack.children if c.name == name)
