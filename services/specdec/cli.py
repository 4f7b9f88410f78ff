"""The `specdec` command: serve a tier, bring the stack up, inspect it, generate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from specdec.config import DEFAULT_PORTS, Settings

DEMO_PROMPT = (
    "Here is a Python function:\n\ndef area(width, height):\n    return width * height\n\n"
    "Rewrite it with type hints and a docstring, keeping the same names."
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one tier's gRPC server")
    serve.add_argument("tier", choices=sorted(DEFAULT_PORTS))
    serve.add_argument("--port", type=int, help="listen port (default: coordinator 50051, draft 50052, target 50053)")
    serve.add_argument("--host")
    serve.add_argument("--advertise-host")
    _model_flags(serve)
    serve.add_argument("--redis-url")
    serve.add_argument("--draft-addresses", help="comma-separated static draft replicas (without Redis)")
    serve.add_argument("--target-addresses", help="comma-separated static target replicas (without Redis)")
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--http-port", type=int, help="coordinator: OpenAI-compatible HTTP API on this port (0 = off)")
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser("up", help="start Valkey and all tiers locally")
    _model_flags(up)
    up.add_argument("--draft-replicas", type=int, default=1)
    up.add_argument("--target-replicas", type=int, default=1)
    up.add_argument(
        "--coordinator-replicas",
        type=int,
        default=1,
        help="coordinators on one Redis (the first on --port): a client given several fails over",
    )
    up.add_argument("--port", type=int, default=DEFAULT_PORTS["coordinator"])
    up.add_argument("--redis-url", default="", help="registry/session records' server (default: start one)")
    up.add_argument(
        "--kv-redis-url", default="", help="KV chunks' server (default: start one, or --redis-url's when given)"
    )
    up.add_argument(
        "--one-valkey",
        action="store_true",
        help="one embedded Valkey for records and KV chunks (volatile-lru: a full one may evict records too)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="first coordinator's OpenAI-compatible HTTP port (default SPECDEC_HTTP_PORT or 8000; 0 = off)",
    )
    up.add_argument("--tls", action="store_true", help="mTLS on every hop with a throw-away CA (prints its files)")
    up.add_argument("--api-key", default="", help="the coordinators accept only this key (Bearer)")
    up.add_argument("--demo", action="store_true", help="generate once, print it, then stop everything")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="replicas registered in Redis")
    status.add_argument("--redis-url", default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    gen = sub.add_parser("generate", help="generate text")
    gen.add_argument("prompt")
    where = gen.add_mutually_exclusive_group()
    where.add_argument(
        "--coordinator",
        default=f"127.0.0.1:{DEFAULT_PORTS['coordinator']}",
        help="HOST:PORT, or several comma-separated: a broken call resumes on the next",
    )
    where.add_argument("--local", action="store_true", help="run the embedded engine in-process")
    _model_flags(gen)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--k", type=int, help="max draft tokens per step")
    gen.add_argument("--no-adaptive", action="store_true")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--json", action="store_true")
    _client_flags(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="plain vs speculative decoding, side by side in one run")
    bench.add_argument("--model", default="smollm2-135m")
    bench.add_argument(
        "--drafter", default="ngram", help="ngram | model:NAME | any registered drafter; comma-separated to compare"
    )
    bench.add_argument("--k", type=int, help="max draft tokens per step (default: the server's, by drafter)")
    bench.add_argument(
        "--prompts",
        help="comma-separated: JSONL files ('prompt' or 'messages' per line, or Spec-Bench's question_id/category/"
        "turns) and/or 'multiturn' (built-in traces quoting the model's own answers); default: bundled set",
    )
    bench.add_argument(
        "--kind", action="append", default=[], help="only prompts of this kind or category (copy, chat, coding, ...)"
    )
    bench.add_argument("--per-category", type=int, default=0, help="at most N prompts (traces) per category; 0: all")
    bench.add_argument("--seed", type=int, default=0, help="seed of the --per-category sample")
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--concurrency", default="1", help="comma-separated levels, e.g. 1,2,4,8,16")
    bench.add_argument(
        "--waves",
        type=int,
        default=3,
        help="requests per concurrency level, as a multiple of the level (at least one per prompt)",
    )
    bench.add_argument("--distributed", action="store_true", help="also through the three services")
    bench.add_argument(
        "--compare-hf",
        action="store_true",
        help="also transformers' own generate, in a subprocess: plain and prompt lookup 3/5/10",
    )
    bench.add_argument("--overlap", action="store_true", help="pre-draft the next step during verification")
    bench.add_argument("--plot", help="write a PNG of speedup vs concurrency and draft length")
    bench.add_argument("--json", dest="json_out", help="write the results to this file")
    bench.set_defaults(func=cmd_bench)

    soak = sub.add_parser("soak", help="steady load for minutes: RSS growth, leaked sessions/keys, errors")
    soak.add_argument("--model", default="smollm2-135m")
    soak.add_argument("--streams", type=int, default=64)
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--warmup-s", type=float, default=60.0)
    soak.set_defaults(func=cmd_soak)

    pb = sub.add_parser("prefix-bench", help="TTFT with a long shared prefix: restored from Redis vs recomputed")
    pb.add_argument("--model", default="smollm2-135m")
    pb.add_argument("--prefix-tokens", type=int, default=1024)
    pb.add_argument("--rounds", type=int, default=5)
    pb.add_argument("--chunk-tokens", type=int, default=256)
    pb.add_argument("--redis-url", default="", help="default: start an embedded Valkey")
    pb.set_defaults(func=cmd_prefix_bench)

    hk = sub.add_parser("hash-key", help="print an API key's line for SPECDEC_API_KEYS_FILE (key read from stdin)")
    hk.set_defaults(func=cmd_hash_key)
    return parser


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default="", help="CA file to check the coordinator's certificate against (TLS on)")
    p.add_argument("--tls-cert", default="", help="client certificate file (mTLS)")
    p.add_argument("--tls-key", default="", help="its key file")
    p.add_argument("--api-key", default=None, help="sent as authorization: Bearer KEY")


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from specdec.rpc.tls import TlsFiles

    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_ca or args.tls_cert else None
    return {"tls": tls, "api_key": args.api_key or None}


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="target model: smollm2-135m, an HF directory or hub id")
    p.add_argument("--drafter", help="none | ngram | suffix | model:NAME")
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--dtype", help="float32 | float16 | bfloat16")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    flags = {
        k: getattr(args, k, None)
        for k in (
            "model",
            "drafter",
            "device",
            "dtype",
            "host",
            "port",
            "advertise_host",
            "redis_url",
            "max_batch_size",
            "http_port",
        )
    }
    for name in ("draft_addresses", "target_addresses"):
        raw = getattr(args, name, None)
        flags[name] = [a for a in raw.split(",") if a] if raw else None
    return Settings.from_env(**flags, **extra)


def _apply_threads(settings: Settings) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _apply_threads(settings)
    from specdec import telemetry

    telemetry.configure(
        args.tier,
        settings.metrics_port,
        settings.host,
        instance=f"{settings.advertise_host or settings.host}:{settings.port_for(args.tier)}",
        prometheus=args.tier == "coordinator" and settings.http_port > 0,
    )  # the HTTP /metrics
    builders = {
        "coordinator": "specdec.coordinator.service",
        "draft": "specdec.draft.service",
        "target": "specdec.target.service",
    }
    module = __import__(builders[args.tier], fromlist=["build"])

    async def run() -> None:
        await module.build(settings).run_until_signal()

    asyncio.run(run())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from specdec.launcher import start_stack

    settings = _settings(args)
    print(
        f"starting valkey, {args.target_replicas} target and {args.draft_replicas} draft replica(s) "
        f"of {settings.model} (drafter {settings.drafter}) ...",
        flush=True,
    )
    stack = start_stack(
        settings.model,
        settings.drafter,
        args.draft_replicas,
        args.target_replicas,
        args.port,
        args.redis_url,
        settings.device,
        settings.dtype,
        coordinator_replicas=args.coordinator_replicas,
        extra_env=_http_env(args),
        tls=args.tls,
        api_key=args.api_key,
        kv_redis_url=args.kv_redis_url,
        one_valkey=args.one_valkey,
    )
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    try:
        for address in stack.coordinators:
            print(f"coordinator: {address}", flush=True)
        for url in stack.http:
            print(f"http: {url}", flush=True)
        print(f"redis: {stack.redis_url}\nkv-redis: {stack.kv_redis_url}\nlogs: {stack.log_dir}", flush=True)
        client_tls = stack.pki.client if stack.pki is not None else None
        if client_tls is not None:
            print(
                f"tls-ca: {client_tls.ca}\ntls-client-cert: {client_tls.cert}\ntls-client-key: {client_tls.key}",
                flush=True,
            )
        if args.demo:
            return _demo(",".join(stack.coordinators), settings.drafter, tls=client_tls, api_key=args.api_key or None)
        print("serving; Ctrl-C to stop", flush=True)
        while not stop["flag"]:
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
        print("stopped", flush=True)


def _http_env(args: argparse.Namespace) -> dict[str, str]:
    """`up`: the first coordinator's HTTP port (the launcher gives any further ones free ports)."""
    port = args.http_port if args.http_port is not None else int(os.environ.get("SPECDEC_HTTP_PORT") or 8000)
    return {"SPECDEC_HTTP_PORT": str(port)}


def _demo(address: str, drafter: str, **options: Any) -> int:
    from specdec.client import Client

    with Client(address, timeout_s=300, **options) as client:
        for d in ("none", drafter):
            print(f"\n--- drafter {d} ---", flush=True)
            done = None
            for event in client.generate(
                messages=[{"role": "user", "content": DEMO_PROMPT}], max_new_tokens=96, drafter=d
            ):
                if event.HasField("chunk"):
                    print(event.chunk.text, end="", flush=True)
                else:
                    done = event.done
            if done is not None:
                s = done.stats
                print(
                    f"\n[{done.stats.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, acceptance "
                    f"{s.acceptance_rate:.2f}, mean accepted length {s.mean_accepted_length:.2f}, "
                    f"steps {s.steps}, ttft {s.ttft_ms:.0f} ms]",
                    flush=True,
                )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from specdec.state.registry import Registry, ReplicaRecord

    settings = Settings.from_env(redis_url=args.redis_url)
    if not settings.redis_url:
        print("no Redis URL: pass --redis-url or set SPECDEC_REDIS_URL", file=sys.stderr)
        return 2

    async def fetch() -> list[ReplicaRecord]:
        registry = Registry(settings.redis_url, settings.redis_prefix)
        try:
            return await registry.replicas()
        finally:
            await registry.close()

    replicas = asyncio.run(fetch())
    if args.json:
        print(json.dumps({"replicas": [r.to_dict() for r in replicas]}, indent=2))
        return 0
    print(f"{'TIER':<12} {'ADDRESS':<22} {'PID':>7} {'MODEL':<24} {'SESSIONS':>8} {'QUEUE':>6}")
    for r in replicas:
        print(
            f"{r.tier:<12} {r.address:<22} {r.pid:>7} {r.model[:24]:<24} "
            f"{r.load.active_sessions:>8} {r.load.queue_depth:>6}"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        drafter=args.drafter,
        max_draft_tokens=args.k,
        adaptive=False if args.no_adaptive else None,
    )
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    out = _generate_local(args, prompt, params) if args.local else _generate_remote(args, prompt, params)
    if args.json:
        print(json.dumps(out))
    else:
        print(out["text"])
        print(f"[{out['finish_reason']}] {json.dumps(out['stats'])}", file=sys.stderr)
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from specdec.benchmarks.soak import soak

    result = soak(args.model, args.streams, args.minutes, args.warmup_s)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


def cmd_hash_key(args: argparse.Namespace) -> int:
    """From stdin, so the key never shows in a process list or shell history."""
    from specdec.rpc.auth import hash_api_key

    key = sys.stdin.readline().strip()
    if not key:
        print("hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(hash_api_key(key))
    return 0


def cmd_prefix_bench(args: argparse.Namespace) -> int:
    from specdec.benchmarks.prefix_bench import prefix_bench

    result = prefix_bench(
        args.model, args.prefix_tokens, rounds=args.rounds, chunk_tokens=args.chunk_tokens, redis_url=args.redis_url
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specdec.benchmarks.bench import DEFAULT_PROMPTS, BenchConfig, run_bench, table

    _apply_threads(Settings.from_env())  # SPECDEC_TORCH_THREADS applies to the embedded runs

    cfg = BenchConfig(
        model=args.model,
        drafter=args.drafter,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        prompts=args.prompts or DEFAULT_PROMPTS,
        kinds=args.kind,
        per_category=args.per_category,
        seed=args.seed,
        concurrency=[int(c) for c in args.concurrency.split(",") if c],
        waves=args.waves,
        distributed=args.distributed,
        compare_hf=args.compare_hf,
        overlap=args.overlap,
        plot=Path(args.plot) if args.plot else None,
    )
    result = run_bench(cfg)
    print(table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


def _generate_local(args: argparse.Namespace, prompt: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    from specdec.core.engine import Engine
    from specdec.core.errors import InvalidArgument
    from specdec.core.request import RequestSpec

    settings = _settings(args)
    try:
        engine = Engine.load(settings.model, params.get("drafter") or settings.drafter, settings.device, settings.dtype)
        result = engine.complete(RequestSpec(**prompt, **params))
    except InvalidArgument as exc:
        raise SystemExit(f"invalid argument: {exc}") from exc
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "stats": result.stats.as_dict(),
    }


def _generate_remote(args: argparse.Namespace, prompt: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from specdec.client import Client
    from specdec.rpc.convert import stats_from_proto
    from specdec.v1 import generation_pb2

    with Client(args.coordinator, **_client_kwargs(args)) as client:
        try:
            reply = client.complete(**prompt, **params)
        except grpc.RpcError as exc:
            raise SystemExit(f"{exc.code().name}: {exc.details()}") from exc
    reason = generation_pb2.FinishReason.Name(reply.finish_reason).removeprefix("FINISH_REASON_").lower()
    return {
        "text": reply.text,
        "token_ids": list(reply.token_ids),
        "finish_reason": reason,
        "stats": stats_from_proto(reply.stats).as_dict(),
    }


if __name__ == "__main__":
    sys.exit(main())
