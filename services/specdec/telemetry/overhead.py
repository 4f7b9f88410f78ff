"""Tracing on vs off, side by side: `python -m specdec.telemetry.overhead`.

Starts two identical stacks of real tier processes, one exporting every span and metric
over OTLP/gRPC to a receiver in this process (which counts and drops them), one with
telemetry off, and alternates the same requests between them so machine noise hits both
alike. Prints tokens/s of each and the ratio (target: >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent import futures

import grpc

PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The cat sat on the mat. The dog sat on the log. The cat sat on the",
    "Here is a list of the planets of the solar system in order: Mercury, Venus,",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def _receiver() -> tuple[grpc.Server, str, dict[str, int]]:
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    counts = {"spans": 0, "metric_exports": 0}

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(
            self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
        ) -> trace_service_pb2.ExportTraceServiceResponse:
            counts["spans"] += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(
            self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.ServicerContext
        ) -> metrics_service_pb2.ExportMetricsServiceResponse:
            counts["metric_exports"] += 1
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
        Traces(), server
    )
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated gRPC code is untyped
        Metrics(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"http://127.0.0.1:{port}", counts


def main(argv: list[str] | None = None) -> int:
    from specdec.client import Client
    from specdec.launcher import free_port, start_stack

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)

    server, endpoint, counts = _receiver()
    base = {"SPECDEC_TORCH_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    on_env = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
    off_env = {
        **base,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "",
        "SPECDEC_METRICS_PORT": "0",
    }
    stacks = {}
    try:
        for name, env in (("off", off_env), ("on", on_env)):
            os.environ["SPECDEC_REDIS_PREFIX"] = env["SPECDEC_REDIS_PREFIX"] = f"specdec-overhead-{name}:"
            stacks[name] = start_stack(args.model, args.drafter, 1, 1, free_port(), extra_env=env)
        totals = {name: {"tokens": 0, "seconds": 0.0} for name in stacks}
        clients = {name: Client(stack.coordinator, timeout_s=600) for name, stack in stacks.items()}
        for client in clients.values():  # warm-up
            client.complete(PROMPTS[0], max_new_tokens=8, drafter=args.drafter)
        for r in range(args.rounds):
            for i, prompt in enumerate(PROMPTS):
                order = ["off", "on"] if (r + i) % 2 == 0 else ["on", "off"]
                for name in order:
                    stats = (
                        clients[name]
                        .complete(
                            prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True, drafter=args.drafter, k=args.k
                        )
                        .stats
                    )
                    totals[name]["tokens"] += stats.generated_tokens
                    totals[name]["seconds"] += stats.elapsed_ms / 1e3
        time.sleep(1.0)  # let the last spans arrive
        tps = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
        result = {
            "model": args.model,
            "drafter": args.drafter,
            "k": args.k,
            "max_new_tokens": args.max_new_tokens,
            "requests_each": args.rounds * len(PROMPTS),
            "tokens_per_s_off": round(tps["off"], 2),
            "tokens_per_s_on": round(tps["on"], 2),
            "ratio_on_over_off": round(tps["on"] / tps["off"], 4),
            "spans_received": counts["spans"],
            "metric_exports_received": counts["metric_exports"],
        }
        print(json.dumps(result, indent=2))
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=2)
        for client in clients.values():
            client.close()
        return 0
    finally:
        for stack in stacks.values():
            stack.stop()
        server.stop(0)


if __name__ == "__main__":
    raise SystemExit(main())
