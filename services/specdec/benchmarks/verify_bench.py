"""Verify-batch judging: the per-item rejection sampler vs the batched one, side by side.

    python -m specdec.benchmarks.verify_bench [--batch 16] [--k 5] [--vocab 49152] [--repeats 10] [--device cpu]

For each mix of requests it builds one verify batch (random logits, drafts drawn from the
drafter's q or proposed by a deterministic drafter), judges it with `rejection_sample` item
by item (host reads per draft token), with `rejection_sample_batch` (one read per batch)
and with the batched path's stacked layout (an accelerator's), checks the verdicts are
identical, and prints the best times (the judges taking turns) and the per-item/batched
ratio. The forward pass is not included: this is the judging that follows it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from specdec.core import transfer
from specdec.core.rejection import RejectionInput, RejectionOutput, rejection_sample, rejection_sample_batch
from specdec.core.rng import Purpose, sample_index, uniform
from specdec.core.sampling import SamplingParams, probs_from_logits, quantize_f16

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, seed=1)
NUCLEUS = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
MIXES: list[tuple[str, list[tuple[SamplingParams, bool]]]] = [  # (params, drafter ships q) per item, cycled
    ("greedy", [(GREEDY, False)]),
    ("sampled, model drafter (q)", [(SAMPLED, True)]),
    ("top-p 0.95, n-gram (one-hot)", [(NUCLEUS, False)]),
    ("half greedy, half sampled (q)", [(GREEDY, False), (SAMPLED, True)]),
]


def build_batch(
    mix: list[tuple[SamplingParams, bool]], batch: int, k: int, vocab: int, device: torch.device
) -> list[RejectionInput]:
    """Target logits near the drafter's, so some drafts are accepted and some rejected."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for b in range(batch):
        base, ships_q = mix[b % len(mix)]
        params = SamplingParams(base.temperature, base.top_k, base.top_p, seed=1000 + b)
        draft_logits = torch.randn(k, vocab, generator=gen) * 3
        target_logits = torch.cat([draft_logits, torch.randn(1, vocab, generator=gen) * 3])
        target_logits += torch.randn(k + 1, vocab, generator=gen)
        q = quantize_f16(probs_from_logits(draft_logits, params)) if ships_q and not params.greedy else None
        if q is not None:
            drafts = [sample_index(q[i], uniform(params.seed, 50 + i, Purpose.DRAFT)) for i in range(k)]
        else:
            drafts = draft_logits.argmax(-1).tolist()
        items.append(RejectionInput(target_logits.to(device), drafts, q, params, 50))
    return items


def per_item_judge(items: list[RejectionInput]) -> list[RejectionOutput]:
    """Today's path before the batched one: item by item, host reads per draft token."""
    return [rejection_sample(item) for item in items]


def stacked_judge(items: list[RejectionInput]) -> list[RejectionOutput]:
    """The batched path with all rows stacked (an accelerator's layout), for comparison."""
    return rejection_sample_batch(items, by_item=False)


def best_s(
    judges: list[Callable[[list[RejectionInput]], list[RejectionOutput]]],
    items: list[RejectionInput],
    repeats: int,
    device: torch.device,
) -> list[float]:
    """Each judge's fastest run, the judges taking turns (a shared machine's load then
    weighs on both alike)."""
    best = [float("inf")] * len(judges)
    for _ in range(repeats + 1):  # the first round warms up
        for j, judge in enumerate(judges):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            judge(items)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[j] = min(best[j], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=5, help="draft tokens per item")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"batch {args.batch}, k {args.k}, vocab {args.vocab}, {device}, {torch.get_num_threads()} threads")
    print(f"{'mix':32} {'per-item ms':>12} {'batched ms':>11} {'speed-up':>9} {'stacked ms':>11}  reads/batch")
    for name, mix in MIXES:
        items = build_batch(mix, args.batch, args.k, args.vocab, device)
        per_item = per_item_judge(items)
        before = transfer.STATS.to_host
        batched = rejection_sample_batch(items)
        reads = transfer.STATS.to_host - before
        assert [(o.num_accepted, o.tokens) for o in batched] == [(o.num_accepted, o.tokens) for o in per_item]
        assert stacked_judge(items) == batched
        old, new, stacked = best_s([per_item_judge, rejection_sample_batch, stacked_judge], items, args.repeats, device)
        accepted = sum(o.num_accepted for o in batched)
        times = f"{old * 1e3:12.2f} {new * 1e3:11.2f} {old / new:8.2f}x {stacked * 1e3:11.2f}"
        print(f"{name:32} {times}  {reads} ({accepted} accepted)")


if __name__ == "__main__":
    main()
