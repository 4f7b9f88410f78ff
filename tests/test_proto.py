"""The protocol: buf lint is clean and the committed generated code matches the protos."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto/specdec/v1").glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", *[f"proto/{p}" for p in protos]],
                   cwd=ROOT, check=True)
    generated = sorted(tmp_path.glob("specdec/v1/*.py"))
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / "services" / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"


def test_buf_lint_is_clean() -> None:
    npx = shutil.which("npx")
    assert npx, "npx (Node.js) is needed to run buf lint"
    result = subprocess.run([npx, "--yes", "@bufbuild/buf", "lint"], cwd=ROOT / "proto",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
