"""`specdec bench`: what speculation buys, measured side by side in one run.

On the same prompts and machine: plain target decoding with this engine (`none`), the
chosen drafter embedded (in-process), optionally the three services on loopback
(`--distributed`) and transformers' own `generate` (`--compare-hf`), plus aggregate
throughput at several concurrency levels. Configurations are interleaved per prompt so
machine noise hits them alike; every reported figure is a ratio or a side-by-side rate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.core import compute
from specdec.core.drafters.model import ModelDrafter
from specdec.core.drafters.registry import parse_drafter
from specdec.core.engine import Engine
from specdec.core.request import RequestSpec, chat_prompt_ids

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    drafter: str = "ngram"
    k: int = 5
    prompts: Path = DEFAULT_PROMPTS
    max_new_tokens: int = 64
    concurrency: list[int] = field(default_factory=lambda: [1])
    distributed: bool = False
    compare_hf: bool = False
    plot: Path | None = None
    kinds: list[str] = field(default_factory=list)  # keep only prompts of these kinds
    overlap: bool = False  # pre-draft the next step during verification
    waves: int = 3  # requests per concurrency level, in multiples of the level


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    def add(self, tokens: int, seconds: float, proposed: int = 0, accepted: int = 0, steps: int = 0) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.proposed += proposed
        self.accepted += accepted
        self.steps += steps

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def load_prompts(path: Path, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if "prompt" not in row and "messages" not in row:
            raise ValueError(f"{path}:{i + 1}: each line needs 'prompt' or 'messages'")
    rows = [r for r in rows if not kinds or r.get("kind") in kinds]
    if not rows:
        raise ValueError(f"{path}: no prompts (kinds {kinds})")
    return rows


def _spec(
    row: dict[str, Any], cfg: BenchConfig, drafter: str, k: int | None = None, adaptive: bool | None = None
) -> RequestSpec:
    return RequestSpec(
        prompt=row.get("prompt"),
        messages=row.get("messages"),
        max_new_tokens=cfg.max_new_tokens,
        drafter=drafter,
        max_draft_tokens=k or cfg.k,
        adaptive=adaptive,
        overlap=cfg.overlap,
    )


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
    sys.stderr.flush()
    if done >= total:
        sys.stderr.write("\n")


async def _sequential(engine: Engine, rows: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, Any]:
    plain, spec = Tally(), Tally()
    predrafts = [0, 0]  # made, used
    identical, per_prompt = True, []
    outputs: list[list[int]] = []
    for i, row in enumerate(rows):
        _progress(i, len(rows), "embedded: plain vs speculative")
        p = await engine.complete_async(_spec(row, cfg, "none"))
        s = await engine.complete_async(_spec(row, cfg, cfg.drafter))
        predrafts[0] += s.stats.predrafts
        predrafts[1] += s.stats.predrafts_used
        plain.add(p.stats.generated_tokens, p.stats.elapsed_s)
        spec.add(
            s.stats.generated_tokens, s.stats.elapsed_s, s.stats.proposed_tokens, s.stats.accepted_tokens, s.stats.steps
        )
        identical &= p.token_ids == s.token_ids
        outputs.append(p.token_ids)
        per_prompt.append(
            {
                "index": i,
                "kind": row.get("kind", ""),
                "tokens": p.stats.generated_tokens,
                "plain_tokens_per_s": round(p.stats.tokens_per_s, 3),
                "spec_tokens_per_s": round(s.stats.tokens_per_s, 3),
                "acceptance_rate": round(s.stats.acceptance_rate, 4),
                "mean_accepted_length": round(s.stats.mean_accepted_length, 3),
                "identical": p.token_ids == s.token_ids,
            }
        )
    _progress(len(rows), len(rows), "embedded done")
    return {
        "plain": plain,
        "spec": spec,
        "identical": identical,
        "per_prompt": per_prompt,
        "outputs": outputs,
        "predraft_use_rate": predrafts[1] / predrafts[0] if predrafts[0] else 0.0,
    }


async def _aggregate(
    engine: Engine,
    rows: list[dict[str, Any]],
    cfg: BenchConfig,
    drafter: str,
    concurrency: int,
    reference: list[list[int]],
) -> tuple[float, bool]:
    """Aggregate tokens/s with `concurrency` requests in flight, and whether every output
    equals the prompt's plain decoding run alone (batching must not change a token).

    Runs `waves` times `concurrency` requests (at least one per prompt), so the ragged end,
    when the last requests finish alone, weighs as little on the figure as it would on a
    server under steady load."""
    total = max(cfg.waves * concurrency, len(rows))
    gate = asyncio.Semaphore(concurrency)
    tokens, identical = 0, True

    async def one(i: int) -> None:
        nonlocal tokens, identical
        async with gate:
            result = await engine.complete_async(_spec(rows[i % len(rows)], cfg, drafter))
            tokens += result.stats.generated_tokens
            identical &= result.token_ids == reference[i % len(rows)]

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    return tokens / (time.perf_counter() - start), identical


async def _by_concurrency(
    engine: Engine, rows: list[dict[str, Any]], cfg: BenchConfig, reference: list[list[int]]
) -> list[dict[str, Any]]:
    out = []
    for n, level in enumerate(cfg.concurrency):
        _progress(n, len(cfg.concurrency), f"concurrency {level}")
        plain, plain_same = await _aggregate(engine, rows, cfg, "none", level, reference)
        spec, spec_same = await _aggregate(engine, rows, cfg, cfg.drafter, level, reference)
        out.append(
            {
                "concurrency": level,
                "plain_tokens_per_s": round(plain, 3),
                "spec_tokens_per_s": round(spec, 3),
                "spec_vs_plain": round(spec / plain, 4) if plain else 0.0,
                "outputs_identical": plain_same and spec_same,
            }
        )
    _progress(len(cfg.concurrency), len(cfg.concurrency), "concurrency done")
    return out


async def _draft_length_sweep(engine: Engine, rows: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    sample, out = rows[: min(3, len(rows))], []
    plain = Tally()
    for row in sample:
        r = await engine.complete_async(_spec(row, cfg, "none"))
        plain.add(r.stats.generated_tokens, r.stats.elapsed_s)
    for k in (1, 2, 4, 8):
        spec = Tally()
        for row in sample:
            r = await engine.complete_async(_spec(row, cfg, cfg.drafter, k=k, adaptive=False))
            spec.add(r.stats.generated_tokens, r.stats.elapsed_s)
        out.append({"k": k, "speedup_vs_plain": round(spec.rate / plain.rate, 4) if plain.rate else 0.0})
    return out


def _distributed(rows: list[dict[str, Any]], cfg: BenchConfig, reference: list[list[int]]) -> dict[str, Any]:
    from specdec.client import AsyncClient
    from specdec.launcher import free_port, start_stack

    stack = start_stack(cfg.model, cfg.drafter, 1, 1, free_port())
    try:

        async def run() -> tuple[Tally, bool]:
            tally, identical = Tally(), True
            async with AsyncClient(stack.coordinator, timeout_s=600) as client:
                for i, row in enumerate(rows):
                    _progress(i, len(rows), "distributed")
                    kw = {"messages": row["messages"]} if "messages" in row else {"prompt": row["prompt"]}
                    reply = await client.complete(**kw, max_new_tokens=cfg.max_new_tokens, drafter=cfg.drafter, k=cfg.k)
                    tally.add(reply.stats.generated_tokens, reply.stats.elapsed_ms / 1e3)
                    identical &= list(reply.token_ids) == reference[i]
            _progress(len(rows), len(rows), "distributed done")
            return tally, identical

        tally, identical = asyncio.run(run())
    finally:
        stack.stop()
    return {"tally": tally, "identical": identical}


def _hf(engine: Engine, rows: list[dict[str, Any]], cfg: BenchConfig, reference: list[list[int]]) -> dict[str, Any]:
    """transformers' own generate: plain, and its matching speculative mode; and whether
    their outputs equal this engine's plain decoding."""
    import torch
    from transformers import GenerationMixin

    model = engine.verifier.worker.runner.model
    assert isinstance(model, GenerationMixin)  # a transformers causal LM
    tok = engine.tokenizer
    extra: dict[str, Any] = {}
    if cfg.drafter == "ngram":
        extra = {"prompt_lookup_num_tokens": cfg.k}
    elif parse_drafter(cfg.drafter).needs_model:
        drafter = engine.drafter.worker.methods[cfg.drafter]
        assert isinstance(drafter, ModelDrafter)  # a drafter that needs a model
        extra = {"assistant_model": drafter.runner.model}
    plain, spec = Tally(), Tally()
    identical = True
    for i, row in enumerate(rows):
        _progress(i, len(rows), "transformers generate")
        if "messages" in row:
            ids = chat_prompt_ids(tok, row["messages"])
        else:
            ids = tok.encode(row["prompt"], add_special_tokens=False)
        inputs = torch.tensor([ids])
        for tally, kwargs in ((plain, {}), (spec, extra)):
            start = time.perf_counter()
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
                **kwargs,
            )
            tally.add(out.shape[1] - len(ids), time.perf_counter() - start)
            identical &= out[0, len(ids) :].tolist() == reference[i]
    _progress(len(rows), len(rows), "transformers done")
    return {"plain": plain.rate, "spec": spec.rate if extra else 0.0, "identical": identical}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    rows = load_prompts(cfg.prompts, cfg.kinds)
    engine = Engine.load(cfg.model, cfg.drafter)

    async def embedded() -> dict[str, Any]:
        await engine.complete_async(_spec(rows[0], cfg, "none"))  # warm-up
        seq = await _sequential(engine, rows, cfg)
        seq["by_concurrency"] = await _by_concurrency(engine, rows, cfg, seq["outputs"])
        seq["by_draft_length"] = await _draft_length_sweep(engine, rows, cfg) if cfg.plot else []
        await engine.aclose()
        return seq

    seq = asyncio.run(embedded())
    plain, spec = seq["plain"], seq["spec"]
    result: dict[str, Any] = {
        "model": cfg.model,
        "drafter": cfg.drafter,
        "k": cfg.k,
        "max_new_tokens": cfg.max_new_tokens,
        "prompts": str(cfg.prompts),
        "num_prompts": len(rows),
        "plain_tokens_per_s": round(plain.rate, 3),
        "spec_tokens_per_s": round(spec.rate, 3),
        "speedup_vs_plain": round(spec.rate / plain.rate, 4) if plain.rate else 0.0,
        "acceptance_rate": round(spec.accepted / spec.proposed, 4) if spec.proposed else 0.0,
        "mean_accepted_length": round(spec.tokens / spec.steps, 4) if spec.steps else 0.0,
        "overlap": cfg.overlap,
        "predraft_use_rate": round(seq["predraft_use_rate"], 4),
        "by_concurrency": seq["by_concurrency"],
        "by_draft_length": seq["by_draft_length"],
        "per_prompt": seq["per_prompt"],
    }
    identical = seq["identical"] and all(level["outputs_identical"] for level in seq["by_concurrency"])
    if cfg.distributed:
        dist = _distributed(rows, cfg, seq["outputs"])
        identical &= dist["identical"]
        result["distributed_tokens_per_s"] = round(dist["tally"].rate, 3)
        result["distributed_vs_embedded"] = round(dist["tally"].rate / spec.rate, 4) if spec.rate else 0.0
    if cfg.compare_hf:
        hf = compute.run_sync(_hf, engine, rows, cfg, seq["outputs"])  # on the engine's thread: see core.compute
        identical &= hf["identical"]
        result["hf_plain_tokens_per_s"] = round(hf["plain"], 3)
        result["hf_spec_tokens_per_s"] = round(hf["spec"], 3)
        result["speedup_vs_hf_spec"] = round(spec.rate / hf["spec"], 4) if hf["spec"] else 0.0
    result["outputs_identical"] = identical
    if cfg.plot is not None:
        plot(result, cfg.plot)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    levels = [r["concurrency"] for r in result["by_concurrency"]]
    left.plot(levels, [r["spec_vs_plain"] for r in result["by_concurrency"]], marker="o")
    left.axhline(1.0, color="grey", linestyle="--")
    left.set(xlabel="concurrency", ylabel="speculative / plain tokens/s", title=f"{result['drafter']}")
    ks = [r["k"] for r in result["by_draft_length"]]
    right.plot(ks, [r["speedup_vs_plain"] for r in result["by_draft_length"]], marker="o")
    right.axhline(1.0, color="grey", linestyle="--")
    right.set(xlabel="draft length k (fixed)", ylabel="speedup vs plain", title="draft length")
    fig.tight_layout()
    fig.savefig(path)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}  drafter {result['drafter']}  k {result['k']}  "
        f"prompts {result['num_prompts']}  max_new_tokens {result['max_new_tokens']}",
        f"{'configuration':<28}{'tokens/s':>10}{'ratio':>10}",
    ]
    plain = result["plain_tokens_per_s"]
    rows = [("plain (this engine)", plain), ("speculative, embedded", result["spec_tokens_per_s"])]
    for key, label in (
        ("distributed_tokens_per_s", "speculative, distributed"),
        ("hf_plain_tokens_per_s", "transformers plain"),
        ("hf_spec_tokens_per_s", "transformers speculative"),
    ):
        if key in result:
            rows.append((label, result[key]))
    lines += [f"{label:<28}{rate:>10.2f}{rate / plain if plain else 0:>10.3f}" for label, rate in rows]
    lines.append(
        f"acceptance {result['acceptance_rate']:.3f}  mean accepted length "
        f"{result['mean_accepted_length']:.2f}  outputs identical {result['outputs_identical']}"
    )
    lines.append(f"{'concurrency':<14}{'plain tok/s':>12}{'spec tok/s':>12}{'spec/plain':>12}")
    lines += [
        f"{r['concurrency']:<14}{r['plain_tokens_per_s']:>12.2f}{r['spec_tokens_per_s']:>12.2f}"
        f"{r['spec_vs_plain']:>12.3f}"
        for r in result["by_concurrency"]
    ]
    return "\n".join(lines)
