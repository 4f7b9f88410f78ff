"""The images `make images` builds, run with `buildah run --isolation chroot` (no daemon).

* the operator image reconciles a SpeculativeDecoder on the API emulator, autoscaling from a
  real Valkey (its Deployments appear, its status says every tier);
* the services image's coordinator runs as uid 10001 until the image's own health check
  (`specdec-health`, Python's gRPC client) says SERVING.

`make test-images` builds the images first (docker/build.sh) and runs this with SPECDEC_SLOW=1.
chroot isolation shares the host's network, so the containers reach loopback ports here; it
enforces neither a read-only root nor dropped capabilities.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulator import EmulatorThread

from tests.conftest import free_port

TAG = os.environ.get("TAG", "0.1.0")
REGISTRY = os.environ.get("REGISTRY", "ghcr.io/specdec")
SERVICES = f"{REGISTRY}/specdec:{TAG}"
OPERATOR = f"{REGISTRY}/specdec-operator:{TAG}"


def wait_for(what: str, check, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Container:
    """A working container of ``image``; ``run`` starts a command in it (a process group)."""

    def __init__(self, image: str) -> None:
        if subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True).returncode:
            pytest.fail(f"image {image} not built: run `make images` first")
        self.id = subprocess.run(
            ["buildah", "from", "--quiet", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.procs: list[subprocess.Popen[bytes]] = []

    def args(self, command: list[str], env: dict[str, str], user: str, volumes: list[str]) -> list[str]:
        out = ["buildah", "run", "--isolation", "chroot", "--user", user]
        for k, v in env.items():
            out += ["--env", f"{k}={v}"]
        for v in volumes:
            out += ["--volume", v]
        return [*out, self.id, "--", *command]

    def start(
        self,
        command: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        user: str = "10001:10001",
        volumes: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self.args(command, env or {}, user, volumes or []),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, command: list[str], env: dict[str, str] | None = None, user: str = "10001:10001"
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args(command, env or {}, user, []), capture_output=True, text=True, timeout=60)

    def remove(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        subprocess.run(["buildah", "rm", self.id], capture_output=True)


@pytest.fixture
def container(request: pytest.FixtureRequest) -> Iterator[type[Container]]:
    made: list[Container] = []

    def make(image: str) -> Container:
        made.append(Container(image))
        return made[-1]

    yield make  # type: ignore[misc]
    for c in made:
        c.remove()


def test_operator_image_reconciles_on_the_emulator(container, valkey, tmp_path: Path) -> None:
    op = container(OPERATOR)
    uid = op.run(["id", "-u"])
    assert uid.stdout.strip() == "10001", uid.stderr
    with EmulatorThread() as api:
        env = {
            "SPECDEC_OPERATOR_API_URL": api.url,
            "SPECDEC_OPERATOR_INTERVAL_S": "0.5",
            "SPECDEC_OPERATOR_LIVENESS": f"http://127.0.0.1:{free_port()}/healthz",
            "SPECDEC_OPERATOR_METRICS_PORT": str(free_port()),
        }
        log = tmp_path / "operator.log"
        proc = op.start(["python3", "-m", "specdec_operator"], log, env)
        path = "/apis/specdec.io/v1alpha1/namespaces/images/speculativedecoders"
        api.request(
            "POST",
            path,
            {
                "apiVersion": "specdec.io/v1alpha1",
                "kind": "SpeculativeDecoder",
                "metadata": {"name": "img", "namespace": "images"},
                "spec": {"model": {"name": "org/model"}, "redis": {"url": valkey.url}},
            },
        )
        try:
            for tier in ("coordinator", "draft", "target"):
                wait_for(
                    f"{tier} deployment",
                    lambda: api.request("GET", f"/apis/apps/v1/namespaces/images/deployments/img-{tier}"),
                    timeout=60,
                )
            status = wait_for(
                "status with every tier and autoscaling on",
                lambda: (api.request("GET", f"{path}/img") or {}).get("status", {}),
                timeout=30,
            )
            assert set(status["tiers"]) == {"coordinator", "draft", "target"}
            assert proc.poll() is None, log.read_text()[-3000:]
        except AssertionError:
            print(log.read_text()[-5000:])
            raise


def test_services_image_coordinator_serves_as_non_root(container, valkey, tmp_path: Path) -> None:
    from specdec.core.models import resolve_model_path

    # The real model's config and tokenizer (all a coordinator loads), readable by uid 10001.
    model = tmp_path / "model"
    model.mkdir(mode=0o755)
    for f in Path(resolve_model_path("smollm2-135m")).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
            (model / f.name).chmod(0o644)
    svc = container(SERVICES)
    uid = svc.run(["id", "-u"])
    assert uid.stdout.strip() == "10001", uid.stderr
    port = free_port()
    env = {
        "SPECDEC_MODEL": "/models/smollm2",
        "SPECDEC_PORT": str(port),
        "SPECDEC_HOST": "127.0.0.1",
        "SPECDEC_REDIS_URL": valkey.url,
        "SPECDEC_REDIS_PREFIX": "specdec:images:",
    }
    log = tmp_path / "coordinator.log"
    started = time.monotonic()
    proc = svc.start(["specdec", "serve", "coordinator"], log, env, volumes=[f"{model}:/models/smollm2:ro"])

    def serving() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        out = svc.run(["specdec-health", f"127.0.0.1:{port}"])
        return out.returncode == 0 and "SERVING" in out.stdout

    wait_for("coordinator SERVING", serving, timeout=120)
    print(f"coordinator SERVING {time.monotonic() - started:.1f} s after start")
    server = [pid for pid in descendants(proc.pid) if b"serve\0coordinator" in cmdline(pid)]
    assert server, "no `specdec serve coordinator` process under buildah run"
    for pid in server:
        uid = next(
            line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")
        )
        assert uid == "10001", (pid, uid)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (buildah run re-executes itself before the command)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found
