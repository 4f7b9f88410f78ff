"""Where a plain decoding step goes at concurrency 1: the embedded engine's step split into
its parts, beside transformers' plain `generate` on the same model and thread count.

    python -m specdec.benchmarks.step_profile                  # SmolLM2-135M, 96 tokens, 5 rounds
    python -m specdec.benchmarks.step_profile --rounds 3 --json out.json

The engine runs in this process with timers (time.perf_counter_ns) around the parts of a
step: the forward pass, the rest of the target's batch (checks, session sync, sampling),
the batcher and compute-thread hand-offs (from `verify` to its verdict, less the batch),
and the loop with detokenizing (from one step's yield to the next, less `verify`). The
timers wrap this process's objects only; nothing in the engine changes. transformers runs
in a child process with the same torch threads (no engine thread alive there), prompt by
prompt between the engine's runs, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from specdec.benchmarks.child import JsonLinesChild
from specdec.core import compute

PARTS = ("forward", "sampling", "target_other", "handoff_in", "handoff_out", "loop_detok")


class Timers:
    """Nanoseconds spent per part, summed over the steps of one run."""

    def __init__(self) -> None:
        self.ns = dict.fromkeys((*PARTS, "verify_batch", "verify", "detok"), 0)
        self.marks: dict[str, int] = {}  # the last start and end of each wrapped part

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = self.marks[part + "_start"] = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.marks[part + "_end"] = time.perf_counter_ns()
                self.ns[part] += self.marks[part + "_end"] - started

        return timed

    def wrap_verify(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`verify`, timed whole and split around the batch that ran it."""

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                ended = time.perf_counter_ns()
                self.ns["verify"] += ended - started
                # in: from the call until its batch started; out: from the batch's end to here
                self.ns["handoff_in"] += self.marks["verify_batch_start"] - started
                self.ns["handoff_out"] += ended - self.marks["verify_batch_end"]

        return timed


def _instrument(engine: Any, timers: Timers) -> None:
    """Timers around the engine's parts (this process's objects; the code is unchanged)."""
    import specdec.core.detokenize as detokenize

    worker = engine.verifier.worker
    worker.runner.forward = timers.wrap("forward", worker.runner.forward)
    worker.judge = timers.wrap("sampling", worker.judge)  # the judge chosen at load (core/judge.py)
    batcher = engine.verifier.batcher
    batcher._run_batch = timers.wrap("verify_batch", batcher._run_batch)
    engine.verifier.verify = timers.wrap_verify(engine.verifier.verify)
    add = detokenize.IncrementalDetokenizer.add
    detokenize.IncrementalDetokenizer.add = timers.wrap("detok", add)  # type: ignore[method-assign]


def _breakdown(ns: dict[str, int], wall_ns: int, tokens: int) -> dict[str, float]:
    """ms per token of each part; the parts sum to the wall time of the run."""
    parts = {
        "forward": ns["forward"],
        "sampling": ns["sampling"],
        "target_other": ns["verify_batch"] - ns["forward"] - ns["sampling"],
        "handoff_in": ns["handoff_in"],
        "handoff_out": ns["handoff_out"],
        "loop_detok": wall_ns - ns["verify"],
    }
    out = {part: round(value / tokens / 1e6, 3) for part, value in parts.items()}
    out["detok"] = round(ns["detok"] / tokens / 1e6, 3)
    out["total"] = round(wall_ns / tokens / 1e6, 3)
    return out


async def _engine_run(engine: Any, ids: list[int], new_tokens: int, timers: Timers) -> dict[str, float]:
    from specdec.core.generation import GenerationResult, generate_stream
    from specdec.core.request import RequestSpec, build_request

    spec = RequestSpec(token_ids=ids, max_new_tokens=new_tokens + 1, ignore_eos=True, drafter="none")
    request, stops = build_request(spec, engine.tokenizer, engine.limits, "none", engine.available_drafters)
    steps = generate_stream(request, engine.tiers, engine.tokenizer, stops, GenerationResult())
    await anext(steps)  # the prefill step is not a decoding step: timing starts after it
    timers.ns = dict.fromkeys(timers.ns, 0)
    started = time.perf_counter_ns()
    tokens = 0
    async for chunk in steps:
        tokens += len(chunk.token_ids)
    return _breakdown(timers.ns, time.perf_counter_ns() - started, tokens)


def _hf_child() -> int:
    """The transformers side: job on stdin ({"model", "threads", "new_tokens"}), then one
    prompt a line; answers ms per decoded token of plain greedy `generate`."""
    import torch

    from specdec.core.models import load_model

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints stays out of the protocol
    job = json.loads(sys.stdin.readline())
    torch.set_num_threads(job["threads"])
    model: Any = load_model(job["model"])  # generate's signature is untyped in transformers
    replies.write(json.dumps({"threads": torch.get_num_threads()}) + "\n")
    replies.flush()
    with torch.inference_mode():
        for line in sys.stdin:
            ids = torch.tensor([json.loads(line)])
            runs = {}
            for n in (1, 1 + job["new_tokens"]):  # the first token is the prefill's: subtract it
                started = time.perf_counter_ns()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
                runs[n] = time.perf_counter_ns() - started
            per_token = (runs[1 + job["new_tokens"]] - runs[1]) / job["new_tokens"] / 1e6
            replies.write(json.dumps({"ms_per_token": round(per_token, 3)}) + "\n")
            replies.flush()
    return 0


class _HF:
    def __init__(self, model: str, threads: int, new_tokens: int) -> None:
        self.child = JsonLinesChild("specdec.benchmarks.step_profile", threads, "--hf-child")
        self.threads = self.child.call({"model": model, "threads": threads, "new_tokens": new_tokens})["threads"]

    def ms_per_token(self, ids: list[int]) -> float:
        return float(self.child.call(ids)["ms_per_token"])

    def close(self) -> None:
        self.child.close()


def step_profile(
    model: str = "smollm2-135m", new_tokens: int = 96, prompt_tokens: int = 200, rounds: int = 5, threads: int = 0
) -> dict[str, Any]:
    """Engine and transformers, alternating per round on a fresh random prompt; medians."""
    import torch

    from specdec.core.engine import Engine

    if threads:
        compute.run_sync(torch.set_num_threads, threads)

    engine = Engine.load(model, drafter="none")
    threads = compute.run_sync(torch.get_num_threads)  # the transformers child gets as many
    timers = Timers()
    _instrument(engine, timers)
    hf = _HF(model, threads, new_tokens)
    rng = random.Random(7)
    runs: list[dict[str, float]] = []
    hf_ms: list[float] = []

    async def main() -> None:
        try:
            warm = [rng.randrange(100, engine.limits.vocab_size) for _ in range(prompt_tokens)]
            await _engine_run(engine, warm, 8, timers)
            hf.ms_per_token(warm)
            for _ in range(rounds):
                ids = [rng.randrange(100, engine.limits.vocab_size) for _ in range(prompt_tokens)]
                runs.append(await _engine_run(engine, ids, new_tokens, timers))
                hf_ms.append(hf.ms_per_token(ids))
        finally:
            await engine.aclose()

    try:
        asyncio.run(main())
    finally:
        hf.close()
    engine_ms = {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}
    hf_median = round(statistics.median(hf_ms), 3)
    return {
        "model": model,
        "threads": threads,
        "hf_threads": hf.threads,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "engine_ms_per_token": engine_ms,
        "hf_ms_per_token": hf_median,
        "engine_vs_hf_speed": round(hf_median / engine_ms["total"], 3),
        "runs": runs,
        "hf_runs": hf_ms,
    }


def format_table(result: dict[str, Any]) -> str:
    ms = result["engine_ms_per_token"]
    labels = {
        "forward": "forward pass",
        "sampling": "sampling (the verify judge)",
        "target_other": "target batch, less the two above",
        "handoff_in": "hand-off in: verify() to its batch",
        "handoff_out": "hand-off out: batch end to verdict",
        "loop_detok": "loop, generation, detokenizing",
        "detok": "  of which detokenizing",
        "total": "engine: one decoded token",
    }
    lines = [
        f"{result['model']}, c=1 plain greedy, {result['prompt_tokens']}-token prompts, "
        f"{result['new_tokens']} tokens, {result['threads']} threads (median of {len(result['runs'])} rounds)",
        f"{'ms per token':40} {'engine':>8}",
    ]
    lines += [f"{labels[key]:40} {ms[key]:>8.3f}" for key in (*PARTS, "detok", "total")]
    lines.append(f"{'transformers generate: one decoded token':40} {result['hf_ms_per_token']:>8.3f}")
    lines.append(f"{'engine speed / transformers speed':40} {result['engine_vs_hf_speed']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--hf-child"]:
        return _hf_child()
    parser = argparse.ArgumentParser(
        prog="python -m specdec.benchmarks.step_profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of both sides (0: torch's default)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    result = step_profile(args.model, args.new_tokens, args.prompt_tokens, args.rounds, args.threads)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
