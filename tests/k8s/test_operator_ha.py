"""Two operator processes with kopf peering against the API emulator: exactly one acts.

The chart runs ``operator.replicas`` pods with one environment; each takes its peering
priority from its pod name (``POD_ID``), so they differ and the lower one stands by (kopf
pauses *every* operator that sees a peer of its own priority). Killing the active one
(SIGKILL: no goodbye in the peering object) hands over once its keepalive is older than
the peering lifetime.

Left out of `make test` (`make test-operator-ha` runs it, SPECDEC_SLOW=1): on the kmock
emulator, about one run in six has the second operator to start never process a peering
event (kopf reports its peering stream unprocessed at exit), so it neither pauses nor
takes over; not seen against a real API server, not understood yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from emulator import EmulatorThread

from specdec_operator.config import name_priority
from tests.conftest import free_port

LIFETIME_S = 6
PEERS = ("specdec-operator-7d9f-a1", "specdec-operator-7d9f-b2")
NS = "ha"
CR = f"/apis/specdec.io/v1alpha1/namespaces/{NS}/speculativedecoders"


def wait_for(what: str, check, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Operator:
    def __init__(self, api: EmulatorThread, pod: str, log: Path) -> None:
        self.pod, self.log = pod, log
        env = {
            **os.environ,
            "SPECDEC_OPERATOR_API_URL": api.url,
            "SPECDEC_OPERATOR_PEERING": "specdec",
            "POD_ID": pod,
            "SPECDEC_OPERATOR_INTERVAL_S": "0.5",
            "SPECDEC_OPERATOR_PEERING_LIFETIME_S": str(LIFETIME_S),
            "SPECDEC_OPERATOR_LOG_LEVEL": "debug",
            "SPECDEC_OPERATOR_LIVENESS": f"http://127.0.0.1:{free_port()}/healthz",
        }
        for name in ("SPECDEC_OPERATOR_PRIORITY", "SPECDEC_OPERATOR_NAMESPACES", "SPECDEC_OPERATOR_REDIS_URL"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specdec_operator"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def acted(self) -> bool:
        """Whether this process ran a handler on a SpeculativeDecoder."""
        return "Handler 'apply_handler' succeeded" in self.text() or "Timer 'autoscale_timer'" in self.text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_one_operator_acts_and_the_other_takes_over(valkey, tmp_path: Path, how: str) -> None:
    assert name_priority(PEERS[0]) != name_priority(PEERS[1])
    active_pod = max(PEERS, key=name_priority)
    with EmulatorThread() as api:
        api.request(
            "POST",
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "specdec"}},
        )
        ops = {pod: Operator(api, pod, tmp_path / f"{pod}.log") for pod in PEERS}
        try:
            standby_pod = next(p for p in PEERS if p != active_pod)
            active, standby = ops[active_pod], ops[standby_pod]
            wait_for("the standby to pause", lambda: "Pausing operations in favour of" in standby.text(), 30)
            api.request(
                "POST",
                CR,
                {
                    "apiVersion": "specdec.io/v1alpha1",
                    "kind": "SpeculativeDecoder",
                    "metadata": {"name": "ha", "namespace": NS},
                    "spec": {
                        "model": {"name": "org/model"},
                        "image": "example.com/specdec:1",
                        "redis": {"url": valkey.url},
                    },
                },
            )
            dep = f"/apis/apps/v1/namespaces/{NS}/deployments/ha-target"
            wait_for("the target Deployment", lambda: api.request("GET", dep), 30)
            time.sleep(2)  # a few timer ticks (0.5 s) of the active one
            assert active.acted(), active.text()[-3000:]
            assert not standby.acted(), standby.text()[-3000:]

            active.stop(signal.SIGKILL if how == "killed" else signal.SIGTERM)
            gone = time.monotonic()
            api.request(
                "PATCH",
                f"{CR}/ha",
                {"spec": {"image": "example.com/specdec:2"}},
                content_type="application/merge-patch+json",
            )
            image = lambda: api.request("GET", dep)["spec"]["template"]["spec"]["containers"][0]["image"]
            wait_for("the standby to apply the edit", lambda: image() == "example.com/specdec:2", LIFETIME_S + 20)
            takeover = time.monotonic() - gone
            print(f"takeover after the active operator was {how}: {takeover:.1f} s (peering lifetime {LIFETIME_S} s)")
            assert "Resuming operations" in standby.text()
            if how == "killed":
                assert takeover <= LIFETIME_S + 10
            else:  # a graceful stop leaves the peering object at once
                assert takeover < LIFETIME_S
        finally:
            for op in ops.values():
                op.stop()
