"""Structured output on a real model: constrained speculative vs constrained plain decoding.

    python -m specdec.benchmarks.structured_bench [--model smollm2-135m] [--drafter ngram] [--repeats 2]

For each schema of the set below (greedy, chat prompts asking for that JSON) it runs plain
and speculative decoding in-process, checks that both outputs are identical and that every
output parses and validates, and prints tokens/s side by side with the ratio; the same
prompts unconstrained give the reference ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from specdec.core.engine import Engine
from specdec.core.grammar import GrammarState, vocab_for_model
from specdec.core.request import RequestSpec

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


def _run(engine: Engine, spec: RequestSpec, repeats: int) -> tuple[list[int], str, float]:
    """(tokens, text, best tokens/s over the repeats)."""
    best = 0.0
    tokens: list[int] = []
    text = ""
    for _ in range(repeats):
        started = time.perf_counter()
        result = engine.complete(spec)
        elapsed = time.perf_counter() - started
        tokens, text = result.token_ids, result.text
        best = max(best, len(tokens) / elapsed)
    return tokens, text, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--schemas", type=int, default=len(SCHEMAS), help="the first N schemas only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed CPUs crawl)")
    args = parser.parse_args()
    import jsonschema
    import torch

    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, args.drafter)
    print(f"{'schema':36} {'mode':13} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} valid same")
    sums = {"json_schema": [0.0, 0.0], "none": [0.0, 0.0]}
    valid = total = 0
    masks_us: list[float] = []
    for what, schema in SCHEMAS[: args.schemas]:
        messages = [
            {"role": "user", "content": f"Describe {what} as JSON with the fields {list(schema['properties'])}."}
        ]
        for kind in ("json_schema", "none"):
            constraint = {"grammar_kind": kind, "grammar": json.dumps(schema)} if kind != "none" else {}
            base = {"messages": messages, "max_new_tokens": args.max_new_tokens, "temperature": 0.0, **constraint}
            plain = _run(engine, RequestSpec(drafter="none", **base), args.repeats)
            spec = _run(engine, RequestSpec(drafter=args.drafter, max_draft_tokens=args.k, **base), args.repeats)
            ok = "-"
            if kind != "none":
                total += 2
                for text in (plain[1], spec[1]):
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        pass
                ok = "yes" if valid == total else "NO"
            if kind != "none":
                masks_us.extend(_mask_times(engine, kind, json.dumps(schema), spec[0]))
            sums[kind][0] += plain[2]
            sums[kind][1] += spec[2]
            mode = "constrained" if kind != "none" else "unconstrained"
            ratio = spec[2] / plain[2]
            same = plain[0] == spec[0]
            print(
                f"{what[:36]:36} {mode:13} {len(spec[0]):6} {plain[2]:11.1f} {spec[2]:10.1f} {ratio:6.2f} {ok:5} {same}"
            )
    for kind, (p, s) in sums.items():
        label = "constrained" if kind != "none" else "unconstrained"
        print(f"mean {label}: speculative / plain tokens/s = {s / p:.2f}")
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
