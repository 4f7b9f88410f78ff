"""The shipped Grafana dashboard's PromQL against a real Prometheus scraping `specdec up`.

Debian's `prometheus` scrapes every tier of `specdec up` (SPECDEC_METRICS_PORT: one port
per process from the base up) once a second while a few generations run (the real
SmolLM2 model, n-gram drafts, Redis KV chunks); then each query of every panel is
evaluated ($__rate_interval = 1m): each must parse, and each must return data, except the
queries listed in NEEDS_KUBERNETES (their series come from outside `specdec up`).

`make test-dashboard` runs it (SPECDEC_SLOW=1); it needs `apt-get install prometheus`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "specdec" / "files" / "dashboard.json"
# Series of the operator (or kube-state-metrics) on a cluster: no `specdec up` process has them.
NEEDS_KUBERNETES = {"specdec_operator_desired_replicas", "kube_deployment_spec_replicas"}
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The quick brown fox jumps over the lazy dog. " * 60,  # > one 256-token KV chunk
    "List three prime numbers and explain why each is prime.",
]


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target with an expression."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out.append((panel["title"], target["expr"]))
    return out


def wait_for(what: str, check, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def prom_query(url: str, expr: str) -> dict:
    q = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as rsp:
            return json.loads(rsp.read())
    except urllib.error.HTTPError as exc:  # 400: the query does not parse
        return json.loads(exc.read())


@pytest.fixture
def stack(tmp_path: Path):
    """`specdec up` with metrics on: (coordinator address, metrics ports)."""
    base = free_port()
    env = {**os.environ, "SPECDEC_METRICS_PORT": str(base), "SPECDEC_REDIS_PREFIX": "specdec:dashboard:"}
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "up", "--port", str(free_port())],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        text = wait_for(
            "specdec up serving",
            lambda: proc.poll() is None and "serving" in log.read_text() and log.read_text(),
            timeout=180,
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        coordinator = next(
            line.split(": ", 1)[1].strip() for line in str(text).splitlines() if line.startswith("coordinator: ")
        )
        yield coordinator, [base + i for i in range(6)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def prometheus(stack, tmp_path: Path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("Debian's prometheus is missing: apt-get install prometheus")
    _, ports = stack
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "specdec", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
                ],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus ready", lambda: _ready(url), timeout=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as rsp:
            return rsp.status == 200
    except OSError:
        return False


def test_every_dashboard_query_parses_and_has_data(stack, prometheus: str) -> None:
    from specdec.client import Client

    coordinator, _ = stack
    up = lambda: len(prom_query(prometheus, "up == 1")["data"]["result"])
    wait_for("the tiers scraped", lambda: up() >= 3, timeout=30)
    with Client(coordinator) as client:
        for round_ in range(3):
            for prompt in PROMPTS:
                client.complete(prompt=prompt, max_new_tokens=24)
            time.sleep(2)
    time.sleep(5)  # a few more scrapes after the last generation
    all_queries = queries()
    parsed, with_data, empty = 0, 0, []
    for title, expr in all_queries:
        expr = expr.replace("$__rate_interval", "1m")
        reply = prom_query(prometheus, expr)
        assert reply["status"] == "success", (title, expr, reply.get("error"))
        parsed += 1
        if reply["data"]["result"]:
            with_data += 1
        else:
            empty.append((title, expr))
    print(
        f"dashboard: {len(all_queries)} queries, {parsed} parse, {with_data} return data; "
        f"empty: {[t for t, _ in empty]}"
    )
    unexplained = [(t, e) for t, e in empty if not any(name in e for name in NEEDS_KUBERNETES)]
    assert not unexplained, unexplained
