#!/opt/specdec/bin/python
"""gRPC health check of a specdec tier (the image's HEALTHCHECK): exit 0 when SERVING.

    specdec-health [HOST:PORT] [SERVICE]

HOST:PORT defaults to 127.0.0.1:$SPECDEC_PORT (50051 when unset); SERVICE to "" (the
server as a whole). Python's own gRPC client, so no probe binary is fetched for the image.
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('SPECDEC_PORT') or 50051}"
    service = argv[2] if len(argv) > 2 else ""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=4)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
