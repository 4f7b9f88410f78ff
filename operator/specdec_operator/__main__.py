"""``python -m specdec_operator``: run the operator with settings from the environment."""

from __future__ import annotations

import logging

import kopf

from .config import OperatorConfig


def main() -> None:
    config = OperatorConfig.from_env()
    logging.basicConfig(level=config.logging_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        standalone=config.peering is None,
        peering_name=config.peering,
        priority=config.priority,
        liveness_endpoint=config.liveness,
    )


if __name__ == "__main__":
    main()
