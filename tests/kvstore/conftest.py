"""Fixtures for the Redis KV tier: tiny seeded llamas with a long context (1,000+ token
prefixes), a wider one whose prefill costs something (time-to-first-token figures), and
helpers to run a stack of real processes and add replicas to it."""

from __future__ import annotations

import contextlib
import sys
import uuid
from pathlib import Path

import pytest

from specdec_records import Keys, ReplicaRecord, connect
from tests import llama_dirs
from tests.conftest import ValkeyProcess, free_port, launch
from tests.waiting import wait_until


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
    return str(
        save_llama(tmp_path_factory.mktemp("wide") / "m", tokenizer, seed=3, layers=6, hidden=256, heads=8, kv_heads=4)
    )


def start(model: str, drafter: str, valkey: ValkeyProcess, targets: int, drafts: int, **env: str):
    """A stack of real processes (own key prefix) on the shared Valkey."""
    prefix = f"specdec-kv-{uuid.uuid4().hex[:6]}:"
    extra = {
        "SPECDEC_REDIS_PREFIX": prefix,
        "SPECDEC_TORCH_THREADS": "1",
        "SPECDEC_HEARTBEAT_S": "0.5",
        "SPECDEC_DRAIN_TIMEOUT_S": "5",
        **env,
    }
    stack = launch(model, drafter, drafts, targets, valkey.url, extra)
    stack.prefix = prefix  # type: ignore[attr-defined]
    return stack


def add_replica(stack, tier: str, name: str, **env: str):
    """Start one more replica of `tier` with the stack's settings (and `env` over them); wait
    until it is healthy and has registered (routing can see it)."""
    from specdec.launcher import wait_healthy

    port = free_port()
    child = stack.spawn(
        name,
        [sys.executable, "-m", "specdec.cli", "serve", tier, "--port", str(port)],
        {**stack.env, **env},
        f"127.0.0.1:{port}",
    )
    wait_healthy(child)
    wait_until(lambda: registered(stack, child.address), timeout_s=30, what=f"{name} to register")
    return child


def registered(stack, address: str) -> dict | None:
    """The registry record of the replica serving `address` (what the coordinator routes on)."""
    client = connect(stack.redis_url)
    try:
        for key in client.scan_iter(Keys(stack.prefix).replicas()):
            raw = client.get(key)
            if raw and (record := ReplicaRecord.from_json(raw)).address == address:
                return record.to_dict()
    finally:
        client.close()
    return None


def child(stack, name: str):
    return next(c for c in stack.children if c.name == name)


def load_of(stack, replica) -> dict:
    """The load a replica last reported in the registry (as the coordinator and operator see it)."""
    record = wait_until(lambda: registered(stack, replica.address), timeout_s=30, what=f"{replica.name}'s record")
    return record["load"]


def restored_tokens(stack, replica) -> int:
    return int(load_of(stack, replica).get("kv_restored_tokens") or 0)


def wait_restored(stack, replica, at_least: int, timeout_s: float = 10) -> int:
    """The replica's restored-token count once its heartbeat reports at least `at_least`, or
    whatever it reports at the deadline (the caller asserts)."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: restored_tokens(stack, replica) >= at_least, timeout_s, what="restored tokens")
    return restored_tokens(stack, replica)


def log_count(replica, text: str) -> int:
    return replica.log.read_text(errors="replace").count(text)
