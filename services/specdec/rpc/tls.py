"""TLS for every gRPC hop, from certificate files that are re-read when they change.

Servers: `server_credentials` builds credentials whose certificate is fetched again on each
new handshake when the files' modification times changed (cert-manager rotates the files
of a mounted Secret in place), so a rotation needs no restart. With a CA file and
`require_client_auth`, only clients with a certificate that CA signed get through (mTLS).

Clients: `channel_credentials` presents this process's certificate (the coordinator's to
the tiers, a user's to the coordinator) and trusts only the CA file; a new channel picks up
rotated files. Tier certificates name `TIER_SERVER_NAME` among their DNS names, so the
coordinator verifies a replica reached by pod IP against that name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)
TIER_SERVER_NAME = "specdec-tier"  # a DNS name every tier certificate carries
COORDINATOR_PEER_NAME = "specdec-coordinator"  # the common name of the coordinator's client certificate


@dataclass(frozen=True)
class TlsFiles:
    cert: str  # PEM certificate chain of this process
    key: str  # its private key
    ca: str = ""  # PEM CA bundle peers are checked against ("" = system roots for clients, no client auth)

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)

    def mtimes(self) -> tuple[float, ...]:
        return tuple(os.stat(p).st_mtime_ns if p else 0 for p in (self.cert, self.key, self.ca))

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.ca).read_bytes() if self.ca else None
        return Path(self.key).read_bytes(), Path(self.cert).read_bytes(), ca


def server_credentials(files: TlsFiles, require_client_auth: bool) -> grpc.ServerCredentials:
    """Credentials that reload `files` when they change (checked at each handshake)."""
    if require_client_auth and not files.ca:
        raise ValueError("SPECDEC_TLS_CA_FILE is required to check client certificates")
    seen = {"mtimes": files.mtimes()}

    def config() -> grpc.ServerCertificateConfiguration:
        key, cert, ca = files._read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            mtimes = files.mtimes()
            if mtimes == seen["mtimes"]:
                return None
            fresh = config()
        except OSError as exc:  # a rotation half way: keep serving with what we have
            log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
            return None
        seen["mtimes"] = mtimes
        log.info("TLS certificate files changed: reloaded")
        return fresh

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=require_client_auth)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """This process's certificate (if any) presented to a server checked against the CA."""
    key, cert, ca = files._read() if files.enabled else (None, None, Path(files.ca).read_bytes() if files.ca else None)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_common_name(context: grpc.aio.ServicerContext) -> str:
    """The common name of the client certificate the peer presented ("" without one)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else ""
