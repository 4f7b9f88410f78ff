"""Structured output on a real model: constrained speculative vs constrained plain decoding.

    python -m specdec.benchmarks.structured_bench [--model smollm2-135m] [--drafter ngram] [--repeats 2]

For each schema of the set below (greedy, chat prompts asking for that JSON) it runs plain
and speculative decoding in-process, checks that both outputs are identical and that every
output parses and validates, and prints tokens/s side by side with the ratio, the tokens
committed per step and the draft worker's time per step (us). `blind` is the constrained
run with the model-free drafter drafting as if unconstrained (DraftWorker.grammar_drafts
off: no forced tokens, no cut; the target still masks), the path before grammar-aware
drafts; the same prompts unconstrained give the reference ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from specdec.core.batcher import NotYet
from specdec.core.drafters.base import DraftMethod, DraftRow
from specdec.core.engine import Engine
from specdec.core.grammar import GrammarState, vocab_for_model
from specdec.core.request import RequestSpec
from specdec.core.types import Proposal

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "a person",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "email": {"type": "string"},
                "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            },
            "required": ["name", "age", "email", "hobbies"],
            "additionalProperties": False,
        },
    ),
    (
        "a book",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "author": {"type": "string"},
                "year": {"type": "integer"},
                "genres": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["title", "author", "year", "genres"],
            "additionalProperties": False,
        },
    ),
    (
        "three cities with their countries",
        {
            "type": "object",
            "properties": {
                "cities": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                        "required": ["city", "country"],
                        "additionalProperties": False,
                    },
                    "minItems": 3,
                    "maxItems": 3,
                }
            },
            "required": ["cities"],
            "additionalProperties": False,
        },
    ),
    (
        "a product review",
        {
            "type": "object",
            "properties": {
                "product": {"type": "string"},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "pros": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "cons": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "recommend": {"type": "boolean"},
            },
            "required": ["product", "rating", "pros", "cons", "recommend"],
            "additionalProperties": False,
        },
    ),
]


class _DraftClock:
    """Wall time drafting in the draft worker (the drafter and the grammar work, per batch:
    one per step at one request at a time)."""

    def __init__(self, engine: Engine) -> None:
        worker = engine.drafter.worker
        self.calls, self.seconds, self._propose = 0, 0.0, worker._propose

        def timed(method: DraftMethod, rows: list[DraftRow]) -> Sequence[Proposal | NotYet]:
            started = time.perf_counter()
            try:
                return self._propose(method, rows)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - started

        worker._propose = timed  # type: ignore[method-assign]  # a benchmark's probe

    def us_per_call(self) -> float:
        us = 1e6 * self.seconds / self.calls if self.calls else 0.0
        self.calls, self.seconds = 0, 0.0
        return us


def _run(engine: Engine, spec: RequestSpec, repeats: int) -> tuple[list[int], str, float, float]:
    """(tokens, text, best tokens/s over the repeats, tokens per step)."""
    best = 0.0
    tokens: list[int] = []
    text = ""
    per_step = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        result = engine.complete(spec)
        elapsed = time.perf_counter() - started
        tokens, text, per_step = result.token_ids, result.text, result.stats.mean_accepted_length
        best = max(best, len(tokens) / elapsed)
    return tokens, text, best, per_step


def _blind(engine: Engine, spec: RequestSpec, repeats: int) -> tuple[list[int], str, float, float]:
    """The run with the model-free drafter blind to the grammar (the target still masks)."""
    engine.drafter.worker.grammar_drafts = False
    try:
        return _run(engine, spec, repeats)
    finally:
        engine.drafter.worker.grammar_drafts = True


def _valid(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--schemas", type=int, default=len(SCHEMAS), help="the first N schemas only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed CPUs crawl)")
    parser.add_argument(
        "--no-blind", action="store_true", help="skip the constrained run with the drafter blind to the grammar"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, args.drafter)
    clock = _DraftClock(engine)
    modes = ["constrained", *([] if args.no_blind else ["blind"]), "unconstrained"]
    print(
        f"{'schema':36} {'mode':13} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6}"
        f" {'tok/step':>8} {'draft us':>8} valid same"
    )
    sums = {mode: [0.0, 0.0] for mode in modes}
    valid = total = 0
    masks_us: list[float] = []
    for what, schema in SCHEMAS[: args.schemas]:
        messages = [
            {"role": "user", "content": f"Describe {what} as JSON with the fields {list(schema['properties'])}."}
        ]
        source = json.dumps(schema)
        plains = {}
        for mode in modes:
            constraint = {"grammar_kind": "json_schema", "grammar": source} if mode != "unconstrained" else {}
            base = {"messages": messages, "max_new_tokens": args.max_new_tokens, "temperature": 0.0, **constraint}
            kind = "unconstrained" if mode == "unconstrained" else "constrained"
            if kind not in plains:
                plains[kind] = _run(engine, RequestSpec(drafter="none", **base), args.repeats)
            plain = plains[kind]
            run = _blind if mode == "blind" else _run
            clock.us_per_call()
            spec = run(engine, RequestSpec(drafter=args.drafter, max_draft_tokens=args.k, **base), args.repeats)
            draft_us = clock.us_per_call()
            ok = "-"
            if kind == "constrained":
                outputs = (spec[1],) if mode == "blind" else (plain[1], spec[1])  # plain counted once
                total += len(outputs)
                valid += sum(_valid(text, schema) for text in outputs)
                ok = "yes" if valid == total else "NO"
                if mode == "constrained":
                    masks_us.extend(_mask_times(engine, "json_schema", source, spec[0]))
            sums[mode][0] += plain[2]
            sums[mode][1] += spec[2]
            ratio = spec[2] / plain[2]
            same = plain[0] == spec[0]
            print(
                f"{what[:36]:36} {mode:13} {len(spec[0]):6} {plain[2]:11.1f} {spec[2]:10.1f} {ratio:6.2f}"
                f" {spec[3]:8.2f} {draft_us:8.0f} {ok:5} {same}"
            )
    labels = {"constrained": "constrained", "blind": "constrained, drafter blind to the grammar"}
    for mode, (p, s) in sums.items():
        print(f"mean {labels.get(mode, mode)}: speculative / plain tokens/s = {s / p:.2f}")
    print(f"valid JSON outputs: {valid}/{total}")
    masks_us.sort()
    print(
        f"mask per token (llguidance, vocab {engine.limits.vocab_size}): mean {sum(masks_us) / len(masks_us):.0f} us,"
        f" p50 {masks_us[len(masks_us) // 2]:.0f} us, p99 {masks_us[int(len(masks_us) * 0.99)]:.0f} us"
    )


def _mask_times(engine: Engine, kind: str, source: str, output: list[int]) -> list[float]:
    """Microseconds to compute the grammar's mask at each position of `output`."""
    runner = engine.verifier.worker.runner
    state = GrammarState(vocab_for_model(runner.model, runner.vocab_size), kind, source)
    times = []
    for i in range(len(output)):
        started = time.perf_counter()
        state.allowed()
        times.append(1e6 * (time.perf_counter() - started))
        state.sync(output[: i + 1])
    return times


if __name__ == "__main__":
    main()
