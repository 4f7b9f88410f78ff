"""The protocol: the committed generated code matches the protos.

Offline: grpc_tools (a test dependency) compiles proto/ into a temporary directory exactly as
`make proto` does. buf lint needs Node and the npm package, so it runs in `make lint`, not here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/specdec/v1").glob("*.proto"))
    assert protos, "no protos found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *[f"proto/{p}" for p in protos],
        ],
        cwd=ROOT,
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("specdec/v1/*.py*"))
    assert len(generated) == 3 * len(protos), f"protoc produced {generated}"
    for path in generated:
        committed = ROOT / "services" / path
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == (tmp_path / path).read_text(), f"{committed} is stale: run `make proto`"
    committed = {p.relative_to(ROOT / "services") for p in (ROOT / "services/specdec/v1").glob("*_pb2*.py*")}
    assert committed == set(generated), f"generated modules without a proto: {committed - set(generated)}"
