"""Slow Kubernetes-delivery checks: the images (buildah) and the dashboard (Prometheus).

They are left out of `make test` (they take minutes, and need buildah or Debian's
prometheus); `make test-images` and `make test-dashboard` run them with SPECDEC_SLOW=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # emulator.py


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SPECDEC_SLOW") == "1":
        return
    skip = pytest.mark.skip(
        reason="slow delivery check: `make test-images` / `make test-dashboard` (SPECDEC_SLOW=1) run it"
    )
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)
