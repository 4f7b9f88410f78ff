"""``python -m specdec_operator.uninstall``: the chart's pre-delete hook.

``helm uninstall`` deletes the operator together with the resources it manages; kopf's
finalizer would then hold every ``SpeculativeDecoder`` (and its GPU Deployments) for good.
Helm runs this Job first, while the operator still runs: it deletes the decoders in the
namespaces the operator watches (``--keep-decoders``: none), waits for the operator to
finish them, then strips kopf's finalizer from any that remain, so that nothing stays stuck
once the operator is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import kopf

from .config import OperatorConfig
from .kube import Kube, NotFound

log = logging.getLogger("specdec_operator.uninstall")
KIND = "SpeculativeDecoder"


def _login(config: OperatorConfig) -> kopf.ConnectionInfo:
    if config.api_url:
        return kopf.ConnectionInfo(server=config.api_url, insecure=True)
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise SystemExit("no Kubernetes credentials (service account or kubeconfig)")
    return info


async def decoders(kube: Kube, namespaces: tuple[str, ...]) -> list[tuple[str, str, list[str]]]:
    """(namespace, name, finalizers) of every decoder in ``namespaces`` (empty: all)."""
    found = []
    for ns in namespaces or (None,):
        for obj in await kube.list(KIND, ns, {}):
            meta = obj["metadata"]
            found.append((meta["namespace"], meta["name"], list(meta.get("finalizers") or [])))
    return found


async def uninstall(kube: Kube, namespaces: tuple[str, ...], delete: bool, timeout_s: float) -> int:
    """Delete (or keep) the decoders, wait for the operator, strip finalizers left; the
    number of decoders whose finalizer had to be stripped."""
    if delete:
        for ns, name, _ in await decoders(kube, namespaces):
            log.info("deleting %s %s/%s", KIND, ns, name)
            await kube.delete(KIND, ns, name)
        deadline = time.monotonic() + timeout_s
        while (left := await decoders(kube, namespaces)) and time.monotonic() < deadline:
            await asyncio.sleep(1)
    stripped = 0
    for ns, name, finalizers in await decoders(kube, namespaces):
        kept = [f for f in finalizers if not f.startswith("kopf.zalando.org/")]
        if kept != finalizers:
            log.warning("%s %s/%s: the operator did not finish it; removing kopf's finalizer", KIND, ns, name)
            try:
                await kube.merge_patch(KIND, ns, name, {"metadata": {"finalizers": kept or None}})
            except NotFound:
                continue
            stripped += 1
    if delete and (left := await decoders(kube, namespaces)):
        log.warning("still there: %s", ", ".join(f"{ns}/{name}" for ns, name, _ in left))
    return stripped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specdec_operator.uninstall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--keep-decoders",
        action="store_true",
        help="leave the decoders running (unmanaged); only strip kopf's finalizer",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the operator to finish the deleted decoders"
    )
    args = parser.parse_args(argv)
    config = OperatorConfig.from_env()
    logging.basicConfig(level=config.logging_level, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> int:
        kube = Kube()
        kube.configure(_login(config))
        try:
            return await uninstall(kube, config.namespaces, not args.keep_decoders, args.timeout)
        finally:
            await kube.close()

    stripped = asyncio.run(run())
    log.info("done (%d finalizer(s) stripped)", stripped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
