"""What the front costs: tokens/s through a plaintext stack's gRPC port, the same stack's
OpenAI-compatible HTTP port, and a stack with mTLS on every hop and an API key, measured
side by side in one run (ratios to plaintext gRPC).

Both stacks (Valkey, target, draft, coordinator each) run at once on the same model; rounds
alternate between the sides, so drift on a noisy machine hits all alike. Each round at
concurrency c sends c requests of the same prompts (greedy, `ignore_eos`, the same number
of tokens) and counts committed tokens over the round's wall time.

    python -m specdec.benchmarks.front_bench --concurrency 1,8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import statistics
import sys
import time
import urllib.request
from typing import Any

PROMPTS = [
    "Explain how a hash map handles collisions, with an example in Python.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List the planets of the solar system and one fact about each.",
    "Summarise the causes of the French Revolution in five bullet points.",
    "Describe how TCP's three-way handshake works and why it is needed.",
    "Translate to French: The weather is nice today, so we will walk to the market.",
    "What are the trade-offs between SQL and NoSQL databases?",
    "Give a recipe for a simple tomato soup.",
]


async def _round(address: str, concurrency: int, new_tokens: int, drafter: str, client_kwargs: dict[str, Any]) -> float:
    """Aggregate committed tokens/s of `concurrency` concurrent requests."""
    from specdec.client import AsyncClient

    if address.startswith("http"):
        return await _http_round(address, concurrency, new_tokens, drafter)

    async with AsyncClient(address, timeout_s=600, **client_kwargs) as client:

        async def one(i: int) -> int:
            reply = await client.complete(
                PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, ignore_eos=True, drafter=drafter
            )
            return int(reply.stats.generated_tokens)

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
        return sum(counts) / (time.perf_counter() - start)


async def _http_round(base_url: str, concurrency: int, new_tokens: int, drafter: str) -> float:
    """The same through POST /v1/completions (urllib in threads: one connection each)."""

    def one(i: int) -> int:
        body = {
            "model": "smollm2-135m",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "speculation": {"drafter": drafter},
        }
        request = urllib.request.Request(
            f"{base_url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as reply:
            return int(json.loads(reply.read())["usage"]["completion_tokens"])

    loop = asyncio.get_running_loop()
    # A pool as wide as the level: asyncio's default one has min(32, cores + 4) threads.
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        counts = await asyncio.gather(*(loop.run_in_executor(pool, one, i) for i in range(concurrency)))
        return sum(counts) / (time.perf_counter() - start)


def front_bench(
    model: str = "smollm2-135m",
    drafter: str = "ngram",
    levels: tuple[int, ...] = (1, 8),
    rounds: int = 5,
    new_tokens: int = 64,
) -> dict[str, Any]:
    """Start a plaintext and a secured stack, alternate rounds; medians and their ratio per level."""
    from specdec.launcher import free_port, start_stack

    api_key = "bench-" + str(time.time_ns())
    plain = start_stack(model, drafter, 1, 1, free_port(), extra_env={"SPECDEC_HTTP_PORT": str(free_port())})
    try:
        secure = start_stack(model, drafter, 1, 1, free_port(), tls=True, api_key=api_key)
        try:
            assert secure.pki is not None
            sides = {
                "plaintext": (plain.coordinator, {}),
                "http": (plain.http[0], {}),
                "mtls": (secure.coordinator, {"tls": secure.pki.client, "api_key": api_key}),
            }
            return _measure(sides, levels, rounds, new_tokens, drafter)
        finally:
            secure.stop()
    finally:
        plain.stop()


def _measure(
    sides: dict[str, tuple[str, dict[str, Any]]], levels: tuple[int, ...], rounds: int, new_tokens: int, drafter: str
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for c in levels:
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for address, kwargs in sides.values():  # warm both: first calls load kernels, open channels
            asyncio.run(_round(address, c, 8, drafter, kwargs))
        for r in range(rounds):
            order = list(sides)[r % len(sides) :] + list(sides)[: r % len(sides)]  # each side first in turn
            for name in order:
                address, kwargs = sides[name]
                samples[name].append(asyncio.run(_round(address, c, new_tokens, drafter, kwargs)))
        medians = {name: statistics.median(s) for name, s in samples.items()}
        results[str(c)] = {
            "tokens_per_s": medians,
            "mtls_over_plaintext": medians["mtls"] / medians["plaintext"],
            "http_over_grpc": medians["http"] / medians["plaintext"],
            "samples": samples,
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", dest="json_out", help="write the results to this file")
    args = parser.parse_args(argv)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    results = front_bench(args.model, args.drafter, levels, args.rounds, args.max_new_tokens)
    print(f"{'c':>3} {'gRPC tok/s':>11} {'HTTP tok/s':>11} {'mTLS+key tok/s':>15} {'HTTP/gRPC':>10} {'mTLS/plain':>11}")
    for c, row in results.items():
        tps = row["tokens_per_s"]
        print(
            f"{c:>3} {tps['plaintext']:>11.1f} {tps['http']:>11.1f} {tps['mtls']:>15.1f}"
            f" {row['http_over_grpc']:>10.3f} {row['mtls_over_plaintext']:>11.3f}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
