"""`specdec bench`: what speculation buys, measured side by side in one run.

On the same prompts and machine: plain target decoding with this engine (`none`), each
chosen drafter embedded (in-process), optionally the three services on loopback
(`--distributed`) and transformers' own `generate` in a process of its own
(`--compare-hf`, see bench_peer), plus aggregate throughput at several concurrency levels.
Configurations are interleaved per prompt so machine noise hits them alike; every reported
figure is a ratio or a side-by-side rate, overall and per prompt category (a Spec-Bench
category, a bundled prompt's kind, or `multiturn` for the traces of bench_prompts).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.benchmarks.bench_peer import Peer
from specdec.benchmarks.bench_prompts import Item, Row, Trace, as_prompt, turns
from specdec.benchmarks.bench_prompts import load_prompts as load_items
from specdec.core import compute
from specdec.core.drafters.registry import parse_drafter
from specdec.core.engine import Engine
from specdec.core.request import RequestSpec, chat_prompt_ids

DEFAULT_PROMPTS = Path(__file__).parent.parent / "data" / "prompts.jsonl"


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    drafter: str = "ngram"  # comma-separated: each is measured; the first is the one swept and served
    k: int | None = None  # max draft tokens; None: the request default (by drafter)
    prompts: Path | str = DEFAULT_PROMPTS  # comma-separated JSONL paths and/or `multiturn`
    max_new_tokens: int = 64
    concurrency: list[int] = field(default_factory=lambda: [1])
    distributed: bool = False
    compare_hf: bool = False
    plot: Path | None = None
    kinds: list[str] = field(default_factory=list)  # keep only prompts of these kinds (categories)
    overlap: bool = False  # pre-draft the next step during verification
    waves: int = 3  # requests per concurrency level, in multiples of the level
    per_category: int = 0  # at most this many prompts (traces) of each kind, drawn with `seed`; 0: all
    seed: int = 0

    @property
    def drafters(self) -> list[str]:
        return [d.strip() for d in self.drafter.split(",") if d.strip()]

    @property
    def primary(self) -> str:
        return self.drafters[0]


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


def _ratio(a: float, b: float, digits: int = 4) -> float:
    return round(a / b, digits) if b else 0.0


def load_prompts(path: Path, kinds: list[str] | None = None) -> list[Row]:
    """The rows of one JSONL file (the bench's own format or Spec-Bench's)."""
    return [item for item in load_items(path, kinds) if isinstance(item, dict)]


def _engine_drafter(cfg: BenchConfig) -> str:
    """The drafter spec to load the engine with: the one that needs a model, if any (every
    engine serves all model-free drafters besides)."""
    if not cfg.drafters:
        raise ValueError("--drafter: name at least one drafter")
    specs = [parse_drafter(d, "drafter") for d in cfg.drafters]
    if any(not s.speculates for s in specs):
        raise ValueError("--drafter: `none` is always measured; name drafters only")
    with_model = {str(s) for s in specs if s.needs_model}
    if len(with_model) > 1:
        raise ValueError(f"--drafter: at most one drafter with a model per run, got {sorted(with_model)}")
    return with_model.pop() if with_model else cfg.primary


def _spec(row: Row, cfg: BenchConfig, drafter: str, k: int | None = None, adaptive: bool | None = None) -> RequestSpec:
    return RequestSpec(
        prompt=row.get("prompt"),
        messages=row.get("messages"),
        max_new_tokens=cfg.max_new_tokens,
        drafter=drafter,
        max_draft_tokens=k or cfg.k,
        adaptive=adaptive,
        overlap=cfg.overlap,
    )


def _prompt_ids(engine: Engine, row: Row) -> list[int]:
    if "messages" in row:
        return chat_prompt_ids(engine.tokenizer, row["messages"])
    return list(engine.tokenizer.encode(row["prompt"], add_special_tokens=False))


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
    sys.stderr.flush()
    if done >= total:
        sys.stderr.write("\n")


# Warm-up runs use a prompt of their own: a drafter that remembers other requests' outputs
# (suffix's shared stream) would otherwise have seen a measured prompt's answer already.
WARMUP = {"kind": "warmup", "messages": [{"role": "user", "content": "Count from one to twenty in words."}]}


async def _measure_row(
    engine: Engine, row: Row, cfg: BenchConfig, peer: Peer | None, index: int
) -> tuple[dict[str, Any], list[int]]:
    """One prompt, every configuration back to back: plain, each drafter, the peer's."""
    p = await engine.complete_async(_spec(row, cfg, "none"))
    entry: dict[str, Any] = {"index": index, "kind": row.get("kind", "")}
    entry |= {key: row[key] for key in ("id", "turn") if key in row}
    entry |= {"prompt_tokens": p.stats.prompt_tokens, "tokens": p.stats.generated_tokens}
    entry |= {"plain_seconds": p.stats.elapsed_s, "plain_tokens_per_s": round(p.stats.tokens_per_s, 3)}
    runs = {}
    for drafter in cfg.drafters:
        s = await engine.complete_async(_spec(row, cfg, drafter))
        st = s.stats
        runs[drafter] = {
            "tokens": st.generated_tokens,
            "seconds": st.elapsed_s,
            "tokens_per_s": round(st.tokens_per_s, 3),
            "proposed": st.proposed_tokens,
            "accepted": st.accepted_tokens,
            "steps": st.steps,
            "predrafts": st.predrafts,
            "predrafts_used": st.predrafts_used,
            "acceptance_rate": round(st.acceptance_rate, 4),
            "mean_accepted_length": round(st.mean_accepted_length, 3),
            "identical": s.token_ids == p.token_ids,
        }
    first = runs[cfg.primary]
    entry |= {key: first[key] for key in ("acceptance_rate", "mean_accepted_length")}
    entry |= {"spec_tokens_per_s": first["tokens_per_s"], "identical": all(r["identical"] for r in runs.values())}
    entry["drafters"] = runs
    if peer is not None:
        entry["hf"] = _peer_runs(peer.measure(_prompt_ids(engine, row)), p.token_ids)
    return entry, p.token_ids


def _peer_runs(reply: dict[str, Any], reference: list[int]) -> dict[str, Any]:
    """The peer's reply without its token ids: tokens, seconds, and whether they equal ours."""

    def run(r: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": len(r["ids"]), "seconds": r["seconds"], "identical": r["ids"] == reference}

    out = {"plain": run(reply["plain"]), "lookup": {n: run(r) for n, r in reply["lookup"].items()}}
    if reply.get("assisted"):
        out["assisted"] = run(reply["assisted"])
    return out


async def _sequential(
    engine: Engine, items: list[Item], cfg: BenchConfig, peer: Peer | None
) -> tuple[list[dict[str, Any]], list[Row], list[list[int]]]:
    """Every prompt in turn (a trace's turns in order, each quoting the answer before it):
    the per-prompt entries, the prompts as run, and their plain outputs."""
    chat = getattr(engine.tokenizer, "chat_template", None) is not None
    entries: list[dict[str, Any]] = []
    rows: list[Row] = []
    outputs: list[list[int]] = []
    total = sum(turns(item) for item in items)
    for item in items:
        answers: list[str] = []
        for turn in range(turns(item)):
            _progress(len(rows), total, "plain vs speculative" + (" vs transformers" if peer else ""))
            row = as_prompt(item.row(turn, answers) if isinstance(item, Trace) else item, chat)
            entry, output = await _measure_row(engine, row, cfg, peer, len(rows))
            entries.append(entry)
            rows.append(row)
            outputs.append(output)
            answers.append(str(engine.tokenizer.decode(output, skip_special_tokens=True)).strip())
    _progress(total, total, "embedded done")
    return entries, rows, outputs


def _summary(entries: list[dict[str, Any]], cfg: BenchConfig, best_lookup: str | None) -> dict[str, Any]:
    """Rates over `entries` (tokens over seconds summed, so long prompts weigh as they cost)."""
    plain = Tally()
    for e in entries:
        plain.add(e["tokens"], e["plain_seconds"])
    by_drafter = {}
    for drafter in cfg.drafters:
        t = Tally()
        for e in entries:
            r = e["drafters"][drafter]
            t.add(r["tokens"], r["seconds"], r["proposed"], r["accepted"], r["steps"])
        by_drafter[drafter] = {
            "tokens_per_s": round(t.rate, 3),
            "speedup_vs_plain": _ratio(t.rate, plain.rate),
            "acceptance_rate": _ratio(t.accepted, t.proposed),
            "mean_accepted_length": _ratio(t.tokens, t.steps),
            "median_prompt_speedup": _median_ratio([(e["drafters"][drafter], _plain_run(e)) for e in entries]),
        }
    first = by_drafter[cfg.primary]
    out: dict[str, Any] = {"prompts": len(entries), "plain_tokens_per_s": round(plain.rate, 3)}
    out |= {"spec_tokens_per_s": first["tokens_per_s"], "speedup_vs_plain": first["speedup_vs_plain"]}
    out |= {"acceptance_rate": first["acceptance_rate"], "mean_accepted_length": first["mean_accepted_length"]}
    out["by_drafter"] = by_drafter
    if entries and "hf" in entries[0]:
        out |= _hf_summary(entries, cfg, plain.rate, first["tokens_per_s"], best_lookup)
    return out


def _plain_run(entry: dict[str, Any]) -> dict[str, Any]:
    return {"tokens": entry["tokens"], "seconds": entry["plain_seconds"]}


def _median_ratio(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> float:
    """The median over prompts of run a's tokens/s over run b's: a burst of load from other
    processes on one prompt moves it less than it moves the summed rates."""
    ratios = [a["tokens"] / a["seconds"] * b["seconds"] / b["tokens"] for a, b in pairs if a["seconds"] and b["tokens"]]
    return round(statistics.median(ratios), 4) if ratios else 0.0


def _hf_rates(entries: list[dict[str, Any]]) -> dict[str, float]:
    """The peer's tokens/s per configuration: `plain`, `lookup:N`, `assisted`."""
    tallies: dict[str, Tally] = {}
    for e in entries:
        hf = e["hf"]
        runs = {"plain": hf["plain"], **{f"lookup:{n}": r for n, r in hf["lookup"].items()}}
        if "assisted" in hf:
            runs["assisted"] = hf["assisted"]
        for name, r in runs.items():
            tallies.setdefault(name, Tally()).add(r["tokens"], r["seconds"])
    return {name: t.rate for name, t in tallies.items()}


def best_lookup(entries: list[dict[str, Any]]) -> str | None:
    """The peer's fastest prompt_lookup_num_tokens over the whole run."""
    rates = _hf_rates(entries) if entries and "hf" in entries[0] else {}
    lookups = {name.partition(":")[2]: rate for name, rate in rates.items() if name.startswith("lookup:")}
    return max(lookups, key=lambda n: lookups[n]) if lookups else None


def _hf_summary(
    entries: list[dict[str, Any]], cfg: BenchConfig, plain: float, spec: float, best: str | None
) -> dict[str, Any]:
    rates = _hf_rates(entries)
    lookup = {name.partition(":")[2]: round(rate, 3) for name, rate in rates.items() if name.startswith("lookup:")}
    best_rate = lookup.get(best or "", 0.0)
    # The peer's speculative mode that matches ours: assisted for a model drafter, else prompt lookup.
    hf_spec = rates["assisted"] if parse_drafter(cfg.primary).needs_model and "assisted" in rates else best_rate
    out: dict[str, Any] = {
        "hf_plain_tokens_per_s": round(rates["plain"], 3),
        "hf_lookup_tokens_per_s": lookup,
        "hf_lookup_best": int(best) if best else 0,
        "hf_prompt_lookup_tokens_per_s": best_rate,
        "hf_lookup_vs_hf_plain": _ratio(best_rate, rates["plain"]),
        "hf_spec_tokens_per_s": round(hf_spec, 3),
        "speedup_vs_hf_spec": _ratio(spec, hf_spec),
        "plain_vs_hf_plain": _ratio(plain, rates["plain"]),
    }
    if "assisted" in rates:
        out["hf_assisted_tokens_per_s"] = round(rates["assisted"], 3)
    if best:
        lookups = [(e["hf"]["lookup"][best], e["hf"]["plain"]) for e in entries]
        ours = [(e["drafters"][cfg.primary], e["hf"]["lookup"][best]) for e in entries]
        out["hf_lookup_vs_hf_plain_median"] = _median_ratio(lookups)
        out["speedup_vs_hf_lookup_median"] = _median_ratio(ours)
    return out


def _by_category(entries: list[dict[str, Any]], cfg: BenchConfig, best: str | None) -> list[dict[str, Any]]:
    kinds = list(dict.fromkeys(e["kind"] for e in entries))  # first-seen order
    return [{"category": k, **_summary([e for e in entries if e["kind"] == k], cfg, best)} for k in kinds]


async def _aggregate(
    engine: Engine,
    rows: list[Row],
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
    _forget(engine)
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


def _forget(engine: Engine) -> None:
    """Drafters that learn from earlier outputs (suffix) forget them: the stage before this
    one ran the same prompts, whose outputs would be drafted whole. A level sending more
    requests than there are prompts still repeats some (the JSON's `repeated_requests`)."""
    for method in engine.drafter.worker.methods.values():
        forget = getattr(method, "forget", None)
        if forget is not None:
            forget()


async def _by_concurrency(
    engine: Engine, rows: list[Row], cfg: BenchConfig, reference: list[list[int]]
) -> list[dict[str, Any]]:
    out = []
    for n, level in enumerate(cfg.concurrency):
        _progress(n, len(cfg.concurrency), f"concurrency {level}")
        plain, plain_same = await _aggregate(engine, rows, cfg, "none", level, reference)
        spec, spec_same = await _aggregate(engine, rows, cfg, cfg.primary, level, reference)
        out.append(
            {
                "concurrency": level,
                "plain_tokens_per_s": round(plain, 3),
                "spec_tokens_per_s": round(spec, 3),
                "spec_vs_plain": _ratio(spec, plain),
                "outputs_identical": plain_same and spec_same,
                "repeated_requests": max(0, max(cfg.waves * level, len(rows)) - len(rows)),
            }
        )
    _progress(len(cfg.concurrency), len(cfg.concurrency), "concurrency done")
    return out


async def _draft_length_sweep(engine: Engine, rows: list[Row], cfg: BenchConfig) -> list[dict[str, Any]]:
    sample, out = rows[: min(3, len(rows))], []
    plain = Tally()
    for row in sample:
        r = await engine.complete_async(_spec(row, cfg, "none"))
        plain.add(r.stats.generated_tokens, r.stats.elapsed_s)
    for k in (1, 2, 4, 8):
        _forget(engine)  # the sample's outputs from the previous k would be drafted whole
        spec = Tally()
        for row in sample:
            r = await engine.complete_async(_spec(row, cfg, cfg.primary, k=k, adaptive=False))
            spec.add(r.stats.generated_tokens, r.stats.elapsed_s)
        out.append({"k": k, "speedup_vs_plain": _ratio(spec.rate, plain.rate)})
    return out


def _distributed(rows: list[Row], cfg: BenchConfig, reference: list[list[int]]) -> dict[str, Any]:
    from specdec.client import AsyncClient
    from specdec.launcher import free_port, start_stack

    stack = start_stack(cfg.model, _engine_drafter(cfg), 1, 1, free_port())
    try:

        async def run() -> tuple[Tally, bool]:
            tally, identical = Tally(), True
            async with AsyncClient(stack.coordinator, timeout_s=600) as client:
                for i, row in enumerate(rows):
                    _progress(i, len(rows), "distributed")
                    kw = {"messages": row["messages"]} if "messages" in row else {"prompt": row["prompt"]}
                    reply = await client.complete(**kw, max_new_tokens=cfg.max_new_tokens, drafter=cfg.primary, k=cfg.k)
                    tally.add(reply.stats.generated_tokens, reply.stats.elapsed_ms / 1e3)
                    identical &= list(reply.token_ids) == reference[i]
            _progress(len(rows), len(rows), "distributed done")
            return tally, identical

        tally, identical = asyncio.run(run())
    finally:
        stack.stop()
    return {"tally": tally, "identical": identical}


def _start_peer(engine: Engine, cfg: BenchConfig, warmup: Row) -> Peer:
    """transformers in its own process, with the torch threads the engine computes with."""
    import torch

    threads = compute.run_sync(torch.get_num_threads)
    spec = parse_drafter(_engine_drafter(cfg))  # a model drafter, if any, is the peer's assistant model
    _progress(0, 1, "starting the transformers peer")
    peer = Peer(cfg.model, cfg.max_new_tokens, threads, assistant=spec.model if spec.needs_model else None)
    try:
        peer.warm_up(_prompt_ids(engine, warmup))
    except BaseException:
        peer.close()
        raise
    _progress(1, 1, "transformers peer ready")
    return peer


async def _embedded(
    engine: Engine, items: list[Item], cfg: BenchConfig, peer: Peer | None, warmup: Row
) -> dict[str, Any]:
    for drafter in ["none", *cfg.drafters]:  # warm-up: first-call costs stay out of the figures
        await engine.complete_async(_spec(warmup, cfg, drafter))
    entries, rows, outputs = await _sequential(engine, items, cfg, peer)
    if peer is not None:
        peer.close()  # before the concurrency runs: its idle threads must not compete
    by_concurrency = await _by_concurrency(engine, rows, cfg, outputs)
    by_draft_length = await _draft_length_sweep(engine, rows, cfg) if cfg.plot else []
    await engine.aclose()
    return {
        "entries": entries,
        "rows": rows,
        "outputs": outputs,
        "by_concurrency": by_concurrency,
        "by_draft_length": by_draft_length,
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    items = load_items(cfg.prompts, cfg.kinds, cfg.per_category, cfg.seed)
    engine = Engine.load(cfg.model, _engine_drafter(cfg))
    warmup = as_prompt(WARMUP, getattr(engine.tokenizer, "chat_template", None) is not None)
    peer = _start_peer(engine, cfg, warmup) if cfg.compare_hf else None
    try:
        run = asyncio.run(_embedded(engine, items, cfg, peer, warmup))
    finally:
        if peer is not None:
            peer.close()  # a no-op when the run closed it
    entries = run["entries"]
    best = best_lookup(entries)
    result: dict[str, Any] = {
        "model": cfg.model,
        "drafter": cfg.drafter,
        "k": cfg.k,
        "max_new_tokens": cfg.max_new_tokens,
        "prompts": str(cfg.prompts),
        "per_category": cfg.per_category,
        "seed": cfg.seed,
        "num_prompts": len(entries),
        "threads": peer.threads if peer else None,
    }
    result |= _summary(entries, cfg, best)
    predrafts = [sum(e["drafters"][cfg.primary][key] for e in entries) for key in ("predrafts", "predrafts_used")]
    result |= {"overlap": cfg.overlap, "predraft_use_rate": _ratio(predrafts[1], predrafts[0])}
    result |= {"by_category": _by_category(entries, cfg, best)}
    result |= {"by_concurrency": run["by_concurrency"], "by_draft_length": run["by_draft_length"]}
    result["per_prompt"] = entries
    identical = all(e["identical"] for e in entries) and all(r["outputs_identical"] for r in run["by_concurrency"])
    if cfg.distributed:
        dist = _distributed(run["rows"], cfg, run["outputs"])
        identical &= dist["identical"]
        result["distributed_tokens_per_s"] = round(dist["tally"].rate, 3)
        result["distributed_vs_embedded"] = _ratio(dist["tally"].rate, result["spec_tokens_per_s"])
    if peer is not None:
        # transformers' kernels differ from ours, so a near-tie can go the other way: reported, not folded in
        result["hf_outputs_identical"] = all(_hf_identical(e["hf"]) for e in entries)
    result["outputs_identical"] = identical
    if cfg.plot is not None:
        plot(result, cfg.plot)
    return result


def _hf_identical(hf: dict[str, Any]) -> bool:
    runs = [hf["plain"], *hf["lookup"].values(), *([hf["assisted"]] if "assisted" in hf else [])]
    return all(r["identical"] for r in runs)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1, 2]})
    levels = [r["concurrency"] for r in result["by_concurrency"]]
    left.plot(levels, [r["spec_vs_plain"] for r in result["by_concurrency"]], marker="o")
    left.axhline(1.0, color="grey", linestyle="--")
    left.set(xlabel="concurrency", ylabel="speculative / plain tokens/s", title=f"{result['drafter'].split(',')[0]}")
    ks = [r["k"] for r in result["by_draft_length"]]
    middle.plot(ks, [r["speedup_vs_plain"] for r in result["by_draft_length"]], marker="o")
    middle.axhline(1.0, color="grey", linestyle="--")
    middle.set(xlabel="draft length k (fixed)", ylabel="speedup vs plain", title="draft length")
    for ax, rows in ((left, levels), (middle, ks)):
        if not rows:  # that sweep was not run
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    _category_bars(right, result)
    fig.tight_layout()
    fig.savefig(path)


def _category_bars(ax: Any, result: dict[str, Any]) -> None:
    """Per category: each drafter's speed-up over our plain decoding and, with the peer,
    transformers' prompt lookup over its own plain generate; the last group is overall."""
    groups = [*result["by_category"], {"category": "overall", **result}]
    series = {d: [g["by_drafter"][d]["speedup_vs_plain"] for g in groups] for d in result["by_drafter"]}
    if "hf_lookup_vs_hf_plain" in result:
        label = f"transformers lookup {result['hf_lookup_best']} (vs its plain)"
        series[label] = [g["hf_lookup_vs_hf_plain"] for g in groups]
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([g["category"] or "-" for g in groups], rotation=45, ha="right")
    ax.set(ylabel="speed-up vs plain (same engine)", title="per category")
    ax.legend(fontsize="small")


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}  drafter {result['drafter']}  k {result['k']}  "
        f"prompts {result['num_prompts']}  max_new_tokens {result['max_new_tokens']}",
        f"{'configuration':<34}{'tokens/s':>10}{'ratio':>10}",
    ]
    plain = result["plain_tokens_per_s"]
    rows = [("plain (this engine)", plain)]
    for drafter, r in result["by_drafter"].items():
        rows.append((f"speculative, embedded ({drafter})", r["tokens_per_s"]))
    if "distributed_tokens_per_s" in result:
        rows.append(("speculative, distributed", result["distributed_tokens_per_s"]))
    if "hf_plain_tokens_per_s" in result:
        rows.append(("transformers plain", result["hf_plain_tokens_per_s"]))
        for n, rate in result["hf_lookup_tokens_per_s"].items():
            best = " (best)" if int(n) == result["hf_lookup_best"] else ""
            rows.append((f"transformers prompt lookup {n}{best}", rate))
        if "hf_assisted_tokens_per_s" in result:
            rows.append(("transformers assisted", result["hf_assisted_tokens_per_s"]))
    lines += [f"{label:<34}{rate:>10.2f}{rate / plain if plain else 0:>10.3f}" for label, rate in rows]
    lines.append(
        f"acceptance {result['acceptance_rate']:.3f}  mean accepted length "
        f"{result['mean_accepted_length']:.2f}  outputs identical {result['outputs_identical']}"
        + (f"  transformers identical {result['hf_outputs_identical']}" if "hf_outputs_identical" in result else "")
    )
    medians = [f"{d} {r['median_prompt_speedup']:.3f}x plain" for d, r in result["by_drafter"].items()]
    if "hf_lookup_vs_hf_plain_median" in result:
        medians.append(f"transformers lookup {result['hf_lookup_vs_hf_plain_median']:.3f}x its plain")
        medians.append(f"{result['drafter'].split(',')[0]} {result['speedup_vs_hf_lookup_median']:.3f}x its lookup")
    lines.append("median over prompts: " + ", ".join(medians))
    lines += _category_table(result)
    if result["by_concurrency"]:
        lines.append(f"{'concurrency':<14}{'plain tok/s':>12}{'spec tok/s':>12}{'spec/plain':>12}")
        lines += [
            f"{r['concurrency']:<14}{r['plain_tokens_per_s']:>12.2f}{r['spec_tokens_per_s']:>12.2f}"
            f"{r['spec_vs_plain']:>12.3f}"
            for r in result["by_concurrency"]
        ]
    return "\n".join(lines)


def _category_table(result: dict[str, Any]) -> list[str]:
    """Per category: our plain tok/s, each drafter's speed-up over it (and acceptance), and
    with the peer its plain tok/s, its best lookup over its plain, and our first drafter over
    its matching mode (that lookup; assisted generation for a model drafter)."""
    drafters = list(result["by_drafter"])
    hf = "hf_plain_tokens_per_s" in result
    head = f"{'category':<16}{'n':>4}{'plain':>9}" + "".join(f"{d[:12]:>13}{'acc':>6}" for d in drafters)
    head += f"{'hf plain':>10}{'hf lookup':>11}{'vs hf spec':>11}" if hf else ""
    lines = [head]
    for g in [*result["by_category"], {"category": "overall", **result, "prompts": result["num_prompts"]}]:
        line = f"{g['category'] or '-':<16}{g['prompts']:>4}{g['plain_tokens_per_s']:>9.2f}"
        for d in drafters:
            r = g["by_drafter"][d]
            line += f"{r['speedup_vs_plain']:>12.3f}x{r['acceptance_rate']:>6.2f}"
        if hf:
            line += f"{g['hf_plain_tokens_per_s']:>10.2f}{g['hf_lookup_vs_hf_plain']:>10.3f}x"
            line += f"{g['speedup_vs_hf_spec']:>10.3f}x"
        lines.append(line)
    return lines
