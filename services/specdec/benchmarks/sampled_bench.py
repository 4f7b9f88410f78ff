"""Sampled speculation, drafters side by side: tokens per step (free of machine noise) and
tokens/s against plain sampling, on Spec-Bench's single-turn questions.

    python -m specdec.benchmarks.sampled_bench --per-category 1 --seeds 3 --temperature 0.7

`specdec bench` is greedy (it checks every output against plain decoding, which sampling
with speculation does not reproduce token for token: it is exact in distribution, which the
tests check). This one compares `suffix` (token trees, verified by multi-step speculative
sampling), `suffix-chain` and `ngram`, each prompt and seed run by every drafter in turn.
"""

from __future__ import annotations

import argparse
import time

from specdec.benchmarks.bench import Tally
from specdec.benchmarks.bench_prompts import Trace, load_prompts
from specdec.core.engine import Engine
from specdec.core.request import RequestSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default="../shared/data/spec_bench.jsonl")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--sample-seed", type=int, default=1, help="seed of the --per-category sample")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--drafters", default="ngram,suffix-chain,suffix")
    args = parser.parse_args()
    engine = Engine.load(args.model, "ngram")
    items = load_prompts(args.prompts, None, args.per_category, args.sample_seed)
    rows = [item for item in items if not isinstance(item, Trace)]
    drafters = ["none", *args.drafters.split(",")]
    tallies = {d: Tally() for d in drafters}
    for row in rows:
        for seed in range(args.seeds):
            for drafter in drafters:
                spec = RequestSpec(
                    prompt=row.get("prompt"),
                    messages=row.get("messages"),
                    max_new_tokens=args.max_new_tokens,
                    drafter=drafter,
                    temperature=args.temperature,
                    seed=seed,
                )
                started = time.perf_counter()
                result = engine.complete(spec)
                s = result.stats
                seconds = time.perf_counter() - started
                tallies[drafter].add(s.generated_tokens, seconds, s.proposed_tokens, s.accepted_tokens, s.steps)
    plain = tallies["none"]
    print(f"{len(rows)} prompts x {args.seeds} seeds, temperature {args.temperature}, {args.max_new_tokens} tokens")
    for drafter, t in tallies.items():
        rate, plain_rate = t.rate, plain.rate
        print(
            f"{drafter:14s} {t.tokens / t.steps:.3f} tokens/step  {t.proposed / t.steps:.2f} drafted/step  "
            f"kept {t.accepted}/{t.proposed}  {rate:.1f} tok/s  {rate / plain_rate:.3f}x plain"
        )


if __name__ == "__main__":
    main()
