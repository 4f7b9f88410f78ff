"""Chunked prefill under load: the longest gap between tokens of short streams while one
long prompt is admitted, with chunking off (the prompt in one pass) and on, side by side in
one run on one engine.

    python -m specdec.benchmarks.prefill_bench                      # SmolLM2-135M, 8 streams, 8,000 tokens
    python -m specdec.benchmarks.prefill_bench --long-tokens 2000 --json out.json
    python -m specdec.benchmarks.prefill_bench --tier draft --long-tokens 4000   # the model drafter's prefill

Each mode: `streams` plain-decoding sessions with short prompts run for `warmup_s`; then the
long prompt is submitted (one new token); the gaps between consecutive tokens of every
stream are recorded from its admission until `tail_s` after its first token. The embedded
engine runs the same target worker and batcher as the target tier.

`--tier draft` measures the draft tier instead: every session (the long one too, two new
tokens so that it drafts) speculates with the model drafter `model:DRAFT` (default
`MODEL@layers=8`, an early-exit draft; fixed draft length), the target
prefills in chunks in both modes, and the modes turn the drafter's chunking off and on.
The embedded engine runs draft and target passes on one compute thread, as a draft replica
runs its sessions' passes one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import torch

from specdec.core import compute
from specdec.core.attention import GROUP_MAX_ROWS
from specdec.core.cost import DEFAULT_PREFILL_CHUNK_S, PrefillCost
from specdec.core.drafters.model import ModelDrafter
from specdec.core.engine import Engine
from specdec.core.generation import GenerationResult, generate_stream
from specdec.core.request import RequestSpec, build_request
from specdec.core.runner import ForwardItem
from specdec.core.target import TargetWorker

SHORT_PROMPT_TOKENS = 32


@dataclass
class ModeResult:
    mode: str  # "one pass" | "chunked"
    chunk_s: float  # the pass budget (0: chunking off)
    longest_gap_s: float  # the longest wait between two tokens of any short stream
    p50_gap_s: float
    p99_gap_s: float
    long_ttft_s: float  # the long prompt's time to its first token
    stream_tokens_per_s: float  # the short streams' tokens per second together, over the window
    passes: int  # forward passes of the measured tier in the window
    chunks: int  # prefill chunks measured in the window
    longest_pass_s: float  # the longest forward pass of the measured tier in the window
    largest_chunk: int  # prompt tokens in the largest chunk


async def _stream(engine: Engine, prompt: list[int], arrivals: list[float], drafter: str) -> None:
    # Fixed drafts (not adaptive): the model drafter runs every step, whatever it costs here.
    spec = RequestSpec(token_ids=prompt, max_new_tokens=4000, ignore_eos=True, drafter=drafter, adaptive=False)
    request, stops = build_request(spec, engine.tokenizer, engine.limits, drafter, engine.available_drafters)
    async for _ in generate_stream(request, engine.tiers, engine.tokenizer, stops, GenerationResult()):
        arrivals.append(time.perf_counter())


def _measured(engine: Engine, tier: str) -> TargetWorker | ModelDrafter:
    """The part that prefills at `tier`: the target worker, or the engine's model drafter."""
    if tier == "target":
        return engine.verifier.worker
    (model,) = [m for m in engine.drafter.worker.methods.values() if isinstance(m, ModelDrafter)]
    return model


async def run_mode(
    engine: Engine,
    chunk_s: float,
    long_prompt: list[int],
    shorts: list[list[int]],
    warmup_s: float,
    tail_s: float,
    tier: str = "target",
) -> ModeResult:
    worker = _measured(engine, tier)
    worker.prefill_chunk_s, worker.prefill_cost = chunk_s, PrefillCost()
    drafter = "none" if tier == "target" else str(engine.default_drafter)
    log: list[tuple[float, int]] = []  # per pass: seconds, prompt tokens in it (items without logits or long)
    forward = worker.runner.forward

    def logged(items: list[ForwardItem]) -> list[torch.Tensor]:
        started = time.perf_counter()
        try:
            return forward(items)
        finally:
            prompt = sum(len(f.tokens) for f in items if f.num_logits == 0 or len(f.tokens) > GROUP_MAX_ROWS)
            log.append((time.perf_counter() - started, prompt))

    worker.runner.forward = logged  # type: ignore[method-assign]  # this process's runner: a timer around it
    arrivals: list[list[float]] = [[] for _ in shorts]
    tasks = [asyncio.ensure_future(_stream(engine, p, times, drafter)) for p, times in zip(shorts, arrivals)]
    try:
        await asyncio.sleep(warmup_s)
        logged_before = len(log)
        admitted = time.perf_counter()
        new = 1 if tier == "target" else 2  # a one-token request does not draft
        spec = RequestSpec(token_ids=long_prompt, max_new_tokens=new, ignore_eos=True, drafter=drafter, adaptive=False)
        await engine.complete_async(spec)
        first = time.perf_counter()
        await asyncio.sleep(tail_s)
        end = time.perf_counter()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        worker.runner.forward = forward  # type: ignore[method-assign]
    gaps: list[float] = []
    tokens = 0
    for times in arrivals:
        # every gap that ends inside the window (the one spanning admission included)
        gaps += [b - a for a, b in pairwise(times) if admitted < b <= end]
        tokens += sum(1 for t in times if admitted < t <= end)
    if not gaps:
        raise RuntimeError("no short stream produced a token during the window")
    gaps.sort()
    return ModeResult(
        "chunked" if chunk_s > 0 else "one pass",
        chunk_s,
        round(gaps[-1], 4),
        round(statistics.median(gaps), 4),
        round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 4),
        round(first - admitted, 3),
        round(tokens / (end - admitted), 2),
        len(log) - logged_before,
        worker.prefill_cost.chunks,
        round(max(seconds for seconds, _ in log[logged_before:]), 4),
        max(tokens for _, tokens in log[logged_before:]),
    )


def prefill_bench(
    model: str = "smollm2-135m",
    long_tokens: int = 8000,
    streams: int = 8,
    chunk_s: float = DEFAULT_PREFILL_CHUNK_S,
    warmup_s: float = 3.0,
    tail_s: float = 2.0,
    seed: int = 1234,
    modes: tuple[str, ...] = ("one pass", "chunked"),
    threads: int = 0,
    tier: str = "target",
    draft_model: str = "",
) -> dict[str, Any]:
    """Both modes on one engine (one pass first, then chunked); returns both and the ratio."""
    if threads:
        compute.run_sync(torch.set_num_threads, threads)
    engine = Engine.load(model, drafter="none" if tier == "target" else f"model:{draft_model or model + '@layers=8'}")
    rng = random.Random(seed)
    vocab = engine.limits.vocab_size
    if not 0 < long_tokens < engine.limits.max_context:
        raise ValueError(f"--long-tokens must be in [1, {engine.limits.max_context - 1}]")

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    shorts = [ids(SHORT_PROMPT_TOKENS) for _ in range(streams)]

    async def main() -> list[ModeResult]:
        try:
            # Warm-up: every kernel and slot class the measured runs use, once.
            await engine.complete_async(RequestSpec(token_ids=ids(600), max_new_tokens=2, drafter="none"))
            budgets = {"one pass": 0.0, "chunked": chunk_s}
            return [await run_mode(engine, budgets[m], ids(long_tokens), shorts, warmup_s, tail_s, tier) for m in modes]
        finally:
            await engine.aclose()

    results = {r.mode: r for r in asyncio.run(main())}
    out: dict[str, Any] = {"model": model, "long_tokens": long_tokens, "streams": streams, "tier": tier}
    if tier == "draft":
        out["drafter"] = str(engine.default_drafter)
    out["threads"] = compute.run_sync(torch.get_num_threads)
    out.update({mode.replace(" ", "_"): asdict(r) for mode, r in results.items()})
    if len(results) == 2:
        out["longest_gap_ratio"] = round(results["chunked"].longest_gap_s / results["one pass"].longest_gap_s, 4)
    return out


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("longest gap between tokens (s)", "longest_gap_s"),
        ("median gap (s)", "p50_gap_s"),
        ("p99 gap (s)", "p99_gap_s"),
        ("long prompt: time to first token (s)", "long_ttft_s"),
        ("short streams: tokens/s together", "stream_tokens_per_s"),
        ("the tier's passes in the window", "passes"),
        ("the tier's longest pass (s)", "longest_pass_s"),
        ("largest prompt tokens in one pass", "largest_chunk"),
    ]
    empty = dict.fromkeys(("chunk_s", "chunks", *(key for _, key in rows)), 0)
    one, chunked = result.get("one_pass", empty), result.get("chunked", empty)
    lines = [
        f"{result['streams']} streams, one {result['long_tokens']}-token prompt admitted, {result['model']}, "
        f"{result['threads']} torch threads, chunking at the {result.get('tier', 'target')} tier"
        + (f" ({result['drafter']})" if "drafter" in result else ""),
        f"{'':40} {'one pass':>10} {'chunked':>10} {'ratio':>7}",
    ]
    for label, key in rows:
        a, b = one[key], chunked[key]
        lines.append(f"{label:40} {a:>10} {b:>10} {b / a if a else float('nan'):>7.3f}")
    lines.append(f"chunked: pass budget {chunked['chunk_s']} s, {chunked['chunks']} chunks")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specdec.benchmarks.prefill_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--long-tokens", type=int, default=8000, help="tokens of the long prompt")
    parser.add_argument("--streams", type=int, default=8, help="short plain-decoding streams")
    parser.add_argument("--chunk-s", type=float, default=DEFAULT_PREFILL_CHUNK_S, help="pass budget when chunked")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--tail-s", type=float, default=2.0)
    threads = int(os.environ.get("SPECDEC_TORCH_THREADS", "0") or 0)
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (SPECDEC_TORCH_THREADS)")
    parser.add_argument("--modes", default="one pass,chunked", help="which of: one pass,chunked")
    parser.add_argument("--tier", choices=("target", "draft"), default="target", help="whose prefill is chunked")
    parser.add_argument("--draft-model", default="", help="with --tier draft: the draft (default: MODEL@layers=8)")
    parser.add_argument("--json", default="", help="write the result here")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(","))
    result = prefill_bench(
        args.model,
        args.long_tokens,
        args.streams,
        args.chunk_s,
        args.warmup_s,
        args.tail_s,
        modes=modes,
        threads=args.threads,
        tier=args.tier,
        draft_model=args.draft_model,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
