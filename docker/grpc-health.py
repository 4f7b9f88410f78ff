#!/opt/specdec/bin/python
"""gRPC health check of a specdec tier (the image's HEALTHCHECK, and the pods' probes under
TLS): exit 0 when SERVING.

    specdec-health [HOST:PORT] [SERVICE] [SERVER_NAME]

HOST:PORT defaults to 127.0.0.1:$SPECDEC_PORT (50051 when unset); SERVICE to "" (the
server as a whole). Python's own gRPC client, so no probe binary is fetched for the image.

With SPECDEC_TLS_CERT_FILE and SPECDEC_TLS_KEY_FILE set (the tier serves TLS; the kubelet's
own gRPC probe speaks plaintext only) it connects over TLS, presents that certificate (a
tier asks every client for one; health stays open to any the CA signed), trusts
SPECDEC_TLS_CA_FILE and checks the server's certificate names SERVER_NAME (default
specdec-tier, the name every tier certificate carries; a coordinator's: its Service name).
The files are read on every run, so a rotated certificate is what the probe presents.
"""

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIER_SERVER_NAME = "specdec-tier"


def channel(address: str, server_name: str) -> grpc.Channel:
    cert, key = os.environ.get("SPECDEC_TLS_CERT_FILE"), os.environ.get("SPECDEC_TLS_KEY_FILE")
    if not (cert and key):
        return grpc.insecure_channel(address)
    ca = os.environ.get("SPECDEC_TLS_CA_FILE")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", server_name)])


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('SPECDEC_PORT') or 50051}"
    service = argv[2] if len(argv) > 2 else ""
    server_name = argv[3] if len(argv) > 3 and argv[3] else TIER_SERVER_NAME
    try:
        ch = channel(address, server_name)
    except OSError as exc:  # a certificate file missing: not healthy
        print(f"{address}: {exc}", file=sys.stderr)
        return 1
    with ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=4)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
