"""Offline replay of greedy speculation: tune drafters without the model.

A greedy output is fixed whatever is drafted, so drafting and greedy verification can be
replayed exactly against it: at each step the drafter proposes (a chain or a tree) from
the committed tokens, the target keeps the longest path that matches the known output plus
one token, and the draft-length controller is fed as the loop feeds it. Time comes from a
pass cost line (base + row_s x rows, the fit `core/cost.py` reports), so the figure is the
speed-up on that cost line, free of this machine's noise; what it leaves out is the step's
overhead beyond the forward pass.

    python -m specdec.benchmarks.replay record --prompts ../shared/data/spec_bench.jsonl,multiturn \\
        --per-category 3 --seed 2 --out outputs.json        # greedy outputs, with the model (slow)
    python -m specdec.benchmarks.replay run outputs.json    # every drafter, per category (seconds)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specdec.core.adaptive import DraftLength, StepCosts
from specdec.core.drafters.base import DraftMethod, DraftSession
from specdec.core.drafters.registry import DRAFTERS, parse_drafter
from specdec.core.rejection import greedy_tree
from specdec.core.request import default_draft_tokens
from specdec.core.sampling import SamplingParams
from specdec.core.types import Proposal, ProposeItem

BASE_S, ROW_S = 0.0225, 0.0013  # SmolLM2-135M, one CPU thread here: one pass, and each row


@dataclass
class Tally:
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    plain_seconds: float = 0.0

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.seconds if self.seconds else 0.0


@dataclass
class Replay:
    by_kind: dict[str, Tally] = field(default_factory=dict)

    def total(self) -> Tally:
        t = Tally()
        for k in self.by_kind.values():
            t.tokens, t.steps = t.tokens + k.tokens, t.steps + k.steps
            t.seconds, t.plain_seconds = t.seconds + k.seconds, t.plain_seconds + k.plain_seconds
        return t


def replay(
    sequences: list[dict[str, Any]], make: Callable[[], DraftMethod], max_k: int, floor: bool, cost: StepCosts
) -> Replay:
    """Each sequence in order through one drafter (so a suffix drafter's shared stream learns
    from the earlier ones, as a server's would)."""
    drafter, result = make(), Replay()
    for seq in sequences:
        prompt, out = seq["prompt"], seq["output"]
        tally = result.by_kind.setdefault(seq["kind"], Tally())
        session = DraftSession(list(prompt))
        drafter.learn(session, list(prompt))
        k = DraftLength(max_k, True, costs=StepCosts(pass_base_s=cost.pass_base_s, row_s=cost.row_s), floor=floor)
        done = 0
        while done < len(out):
            committed, proposed, accepted = _step(drafter, session, out, done, min(k.k, len(out) - done - 1))
            session.tokens.extend(committed)
            drafter.learn(session, committed)
            done += len(committed)
            tally.tokens, tally.steps = tally.tokens + len(committed), tally.steps + 1
            tally.seconds += cost.pass_base_s + cost.row_s * (proposed + 1)
            k.update(proposed, accepted, cost)
        tally.plain_seconds += len(out) * (cost.pass_base_s + cost.row_s)
        drafter.release(session)
    return result


def _step(
    drafter: DraftMethod, session: DraftSession, out: list[int], done: int, want: int
) -> tuple[list[int], int, int]:
    """One verified step against the known output: (committed tokens, drafted, kept)."""
    tokens: list[int] = []
    parents: list[int] | None = None
    if want > 0:
        (proposal,) = drafter.propose([(session, ProposeItem("replay", 0, [], want, SamplingParams(), ""))])
        assert isinstance(proposal, Proposal)  # a model-free drafter never defers
        tokens, parents = proposal.tokens, proposal.parents
    parents = parents if parents is not None else list(range(-1, len(tokens) - 1))
    depth: list[int] = []
    for parent in parents:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    # The target's argmax after a node on the right path is the output's next token; off
    # that path the walk never reads it.
    argmax = [out[done], *(out[done + d + 1] if done + d + 1 < len(out) else -1 for d in depth)]
    verdict = greedy_tree(argmax, tokens, parents)
    committed = verdict.tokens[: len(out) - done]
    assert committed == out[done : done + len(committed)], "a greedy step must commit the known output"
    return committed, len(tokens), verdict.num_accepted


def record(args: argparse.Namespace) -> None:
    """Greedy outputs of the prompts (traces turn by turn, each quoting the answer before)."""
    from specdec.benchmarks.bench_prompts import Trace, as_prompt, load_prompts, turns
    from specdec.core.engine import Engine
    from specdec.core.request import RequestSpec, chat_prompt_ids

    engine = Engine.load(args.model, "ngram")
    sequences = []
    for item in load_prompts(args.prompts, None, args.per_category, args.seed):
        answers: list[str] = []
        for turn in range(turns(item)):
            row = as_prompt(item.row(turn, answers) if isinstance(item, Trace) else item, True)
            ids = chat_prompt_ids(engine.tokenizer, row["messages"])
            result = engine.complete(RequestSpec(token_ids=ids, max_new_tokens=args.max_new_tokens, drafter="ngram"))
            sequences.append({"kind": row.get("kind", ""), "prompt": ids, "output": list(result.token_ids)})
            answers.append(str(engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)).strip())
    with open(args.out, "w") as f:
        json.dump(sequences, f)
    print(f"{len(sequences)} greedy outputs -> {args.out}")


def run(args: argparse.Namespace) -> None:
    with open(args.outputs) as f:
        sequences = json.load(f)
    cost = StepCosts(pass_base_s=args.base_s, row_s=args.row_s)
    print(f"{len(sequences)} sequences; pass {args.base_s * 1e3:.1f} ms + {args.row_s * 1e3:.2f} ms a row")
    for name in args.drafters.split(","):
        cls = DRAFTERS[name]
        for floor in (False, True):
            for max_k in sorted({5, default_draft_tokens(parse_drafter(name))}):
                got = replay(sequences, cls, max_k, floor, cost)
                t = got.total()
                cats = " ".join(f"{kind[:8]}={k.speedup:.2f}" for kind, k in got.by_kind.items())
                label = f"{name} k{max_k}{' floor' if floor else ''}"
                print(f"{label:24s} {t.tokens / t.steps:.3f} tokens/step  {t.speedup:.3f}x plain | {cats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="greedy outputs of a prompt set, with the model")
    rec.add_argument("--model", default="smollm2-135m")
    rec.add_argument("--prompts", default="../shared/data/spec_bench.jsonl,multiturn")
    rec.add_argument("--per-category", type=int, default=3)
    rec.add_argument("--seed", type=int, default=2)
    rec.add_argument("--max-new-tokens", type=int, default=128)
    rec.add_argument("--out", default="outputs.json")
    rep = sub.add_parser("run", help="replay every drafter against recorded outputs")
    rep.add_argument("outputs")
    rep.add_argument("--drafters", default="ngram,suffix-chain,suffix")
    rep.add_argument("--base-s", type=float, default=BASE_S)
    rep.add_argument("--row-s", type=float, default=ROW_S)
    args = parser.parse_args()
    record(args) if args.command == "record" else run(args)


if __name__ == "__main__":
    main()
