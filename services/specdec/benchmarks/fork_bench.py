"""What sharing the prompt's KV saves an n > 1 request: prompt rows the target computes and
the request's wall time, through the OpenAI-compatible HTTP front, with forking on
(core/kv_fork.py) and off (SPECDEC_KV_FORK_TOKENS=0), side by side in one run.

Two stacks (Valkey, target, draft, coordinator each) run at once on the same model; rounds
alternate which side goes first. Every request gets a prompt of fresh random token ids
(nothing of it is cached anywhere: neither a live session nor the Redis KV chunks hold it),
so each round measures a cold prompt. The row counts come from the target's registry load
(`prefill_tokens`, `forked_tokens`), read once its heartbeats have caught up.

    python -m specdec.benchmarks.fork_bench --prompt-tokens 500 --n 4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from typing import Any

HEARTBEAT_S = 0.5


def _complete(base_url: str, prompt: list[int], n: int, new_tokens: int, drafter: str) -> float:
    """Wall seconds of one greedy POST /v1/completions with n choices."""
    body = {
        "prompt": prompt,
        "n": n,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "speculation": {"drafter": drafter},
    }
    request = urllib.request.Request(
        f"{base_url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        out = json.loads(reply.read())
    elapsed = time.perf_counter() - start
    assert out["usage"]["completion_tokens"] == n * new_tokens, out["usage"]
    return elapsed


async def _target_rows(redis_url: str, prefix: str) -> tuple[int, int]:
    """(prompt rows computed, rows forked) summed over the target replicas, once two reads
    a few heartbeats apart agree."""
    from specdec.state.registry import Registry

    registry = Registry(redis_url, prefix)
    try:
        last = None
        while True:
            records = await registry.replicas("target")
            now = (
                sum(int(r.load.extra.get("prefill_tokens") or 0) for r in records),
                sum(int(r.load.extra.get("forked_tokens") or 0) for r in records),
            )
            if now == last:
                return now
            last = now
            await asyncio.sleep(2.5 * HEARTBEAT_S)
    finally:
        await registry.close()


def fork_bench(
    model: str = "smollm2-135m",
    drafter: str = "ngram",
    prompt_tokens: int = 500,
    n: int = 4,
    rounds: int = 3,
    new_tokens: int = 16,
    kv_store: bool = True,
) -> dict[str, Any]:
    """`kv_store` False: no Redis KV chunks (SPECDEC_KV_CHUNK_TOKENS=0), so the siblings of
    the no-fork side cannot restore the prompt's whole chunks the first choice offered."""
    from specdec.core.models import load_tokenizer
    from specdec.launcher import free_port, start_stack

    vocab = len(load_tokenizer(model))
    env = {"SPECDEC_HEARTBEAT_S": str(HEARTBEAT_S), **({} if kv_store else {"SPECDEC_KV_CHUNK_TOKENS": "0"})}
    stacks = {}
    try:
        for name, fork in (("fork", "32"), ("no_fork", "0")):
            extra = {**env, "SPECDEC_KV_FORK_TOKENS": fork, "SPECDEC_HTTP_PORT": str(free_port())}
            stacks[name] = start_stack(model, drafter, 1, 1, free_port(), extra_env=extra)
        rnd = random.Random(time.time_ns())
        sides: dict[str, dict[str, list[float]]] = {s: {"seconds": [], "computed": [], "forked": []} for s in stacks}
        for stack in stacks.values():  # warm-up: first calls load kernels, open channels
            _complete(stack.http[0], [rnd.randrange(vocab) for _ in range(prompt_tokens)], n, 4, drafter)
        for r in range(rounds):
            order = list(stacks)[r % 2 :] + list(stacks)[: r % 2]
            for name in order:
                stack = stacks[name]
                prefix = stack.env.get("SPECDEC_REDIS_PREFIX", "specdec:")
                before = asyncio.run(_target_rows(stack.redis_url, prefix))
                prompt = [rnd.randrange(vocab) for _ in range(prompt_tokens)]
                sides[name]["seconds"].append(_complete(stack.http[0], prompt, n, new_tokens, drafter))
                after = asyncio.run(_target_rows(stack.redis_url, prefix))
                sides[name]["computed"].append(after[0] - before[0])
                sides[name]["forked"].append(after[1] - before[1])
    finally:
        for stack in stacks.values():
            stack.stop()
    medians = {name: {k: statistics.median(v) for k, v in side.items()} for name, side in sides.items()}
    return {
        "prompt_tokens": prompt_tokens,
        "n": n,
        "new_tokens": new_tokens,
        "kv_store": kv_store,
        "medians": medians,
        "seconds_fork_over_no_fork": medians["fork"]["seconds"] / medians["no_fork"]["seconds"],
        "samples": sides,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-kv-store", action="store_true", help="no Redis KV chunks on either side")
    parser.add_argument("--json", dest="json_out", help="write the results to this file")
    args = parser.parse_args(argv)
    out = fork_bench(
        args.model, args.drafter, args.prompt_tokens, args.n, args.rounds, args.max_new_tokens, not args.no_kv_store
    )
    store = "Redis KV chunks on" if out["kv_store"] else "no Redis KV chunks"
    print(f"n={out['n']}, {out['prompt_tokens']}-token prompt, {out['new_tokens']} tokens a choice, {store} (medians)")
    print(f"{'side':>8} {'prompt rows computed':>21} {'rows forked':>12} {'wall s':>8}")
    for name, m in out["medians"].items():
        print(f"{name:>8} {m['computed']:>21.0f} {m['forked']:>12.0f} {m['seconds']:>8.3f}")
    print(f"wall time fork / no fork: {out['seconds_fork_over_no_fork']:.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
