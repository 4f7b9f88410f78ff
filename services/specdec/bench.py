"""`specdec bench`: plain target decoding against each drafter on the same prompts, in one
run, embedded (in-process). Drafters are interleaved per prompt so machine noise hits all
configurations alike; every figure is a ratio measured side by side."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from specdec.core.engine import Engine
from specdec.core.request import RequestSpec

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"


def load_prompts(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if "prompt" not in row and "messages" not in row:
            raise ValueError(f"{path}:{i + 1}: each line needs 'prompt' or 'messages'")
    return rows


async def _run(engine: Engine, row: dict[str, Any], drafter: str, k: int, max_new: int):
    spec = RequestSpec(prompt=row.get("prompt"), messages=row.get("messages"), max_new_tokens=max_new,
                       drafter=drafter, max_draft_tokens=k)
    return await engine.complete_async(spec)


def bench(model: str, drafters: list[str], prompts: Path, max_new_tokens: int, k: int) -> dict[str, Any]:
    model_drafters = [d for d in drafters if d.startswith("model:")]
    engine = Engine.load(model, model_drafters[0] if model_drafters else "ngram")
    rows = load_prompts(prompts)
    configs = ["none", *drafters]
    totals = {c: {"tokens": 0, "seconds": 0.0, "proposed": 0, "accepted": 0, "identical": True} for c in configs}
    per_prompt = []

    async def run_all() -> None:
        await _run(engine, rows[0], "none", k, 4)  # warm-up
        for i, row in enumerate(rows):
            outs = {c: await _run(engine, row, c, k, max_new_tokens) for c in configs}
            for c, r in outs.items():
                t = totals[c]
                t["tokens"] += r.stats.generated_tokens
                t["seconds"] += r.stats.elapsed_s
                t["proposed"] += r.stats.proposed_tokens
                t["accepted"] += r.stats.accepted_tokens
                t["identical"] &= r.token_ids == outs["none"].token_ids
            per_prompt.append({"index": i, "kind": row.get("kind", ""), **{
                c: {"tokens_per_s": round(r.stats.tokens_per_s, 2), "acceptance_rate": round(r.stats.acceptance_rate, 3)}
                for c, r in outs.items()}})
            print(f"prompt {i + 1}/{len(rows)} done", flush=True)
        await engine.aclose()

    asyncio.run(run_all())
    plain = totals["none"]["tokens"] / totals["none"]["seconds"]
    summary = {}
    for c in configs:
        t = totals[c]
        tps = t["tokens"] / t["seconds"]
        summary[c] = {"tokens_per_s": round(tps, 2), "speedup_vs_plain": round(tps / plain, 3),
                      "acceptance_rate": round(t["accepted"] / t["proposed"], 3) if t["proposed"] else 0.0,
                      "outputs_identical": t["identical"]}
    return {"model": model, "max_new_tokens": max_new_tokens, "k": k, "prompts": str(prompts),
            "plain_tokens_per_s": round(plain, 2), "by_drafter": summary,
            "outputs_identical": all(v["outputs_identical"] for v in summary.values()), "per_prompt": per_prompt}
