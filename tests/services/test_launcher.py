"""`start_stack` survives a tier port that was taken between picking and binding."""

from __future__ import annotations

import socket

from specdec import launcher
from specdec.client import Client


def test_tier_whose_port_was_taken_starts_on_another(tiny_models, valkey, monkeypatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = launcher.free_port
    monkeypatch.setattr(launcher, "free_port", lambda: next(ports, None) or real())
    monkeypatch.setenv("SPECDEC_REDIS_PREFIX", "specdec-launcher-test:")
    stack = launcher.start_stack(
        tiny_models[0], "ngram", 1, 1, real(), valkey.url, extra_env={"SPECDEC_TORCH_THREADS": "1"}
    )
    try:
        assert any(child.proc.poll() not in (None, 0) for child in stack.children), "the first target did not fail"
        with Client(stack.coordinator, timeout_s=60) as client:
            assert client.complete("hello there", max_new_tokens=3, ignore_eos=True).stats.generated_tokens == 3
    finally:
        stack.stop()
        taken.close()
