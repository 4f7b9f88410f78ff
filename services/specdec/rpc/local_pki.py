"""A throw-away CA and certificates for `specdec up --tls` and the tests (trustme).

One CA signs: the tiers' server certificate (DNS `specdec-tier`, localhost, 127.0.0.1),
the coordinator's (common name `specdec-coordinator`, serving clients on localhost and
presenting itself to the tiers), and a client certificate for the caller. Each process
gets its own key: a tier cannot pass for a coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specdec.rpc.tls import COORDINATOR_PEER_NAME, TIER_SERVER_NAME, TlsFiles


@dataclass(frozen=True)
class LocalPki:
    ca: str
    tier: TlsFiles
    coordinator: TlsFiles
    client: TlsFiles

    def for_tier(self, tier: str) -> TlsFiles:
        return self.coordinator if tier == "coordinator" else self.tier


def make_local_pki(directory: Path) -> LocalPki:
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="specdec local CA")
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))

    def issue(name: str, *identities: str, common_name: str) -> TlsFiles:
        cert = ca.issue_cert(*identities, common_name=common_name)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        key_path.chmod(0o600)
        return TlsFiles(str(cert_path), str(key_path), str(ca_path))

    return LocalPki(
        ca=str(ca_path),
        tier=issue("tier", TIER_SERVER_NAME, "localhost", "127.0.0.1", common_name=TIER_SERVER_NAME),
        coordinator=issue("coordinator", "localhost", "127.0.0.1", common_name=COORDINATOR_PEER_NAME),
        client=issue("client", "specdec-client", common_name="specdec-client"),
    )


def tls_env(files: TlsFiles) -> dict[str, str]:
    return {"SPECDEC_TLS_CERT_FILE": files.cert, "SPECDEC_TLS_KEY_FILE": files.key, "SPECDEC_TLS_CA_FILE": files.ca}
