"""`specdec bench` end to end on the tiny models: every configuration runs, the JSON has
the documented keys, and greedy outputs of all configurations are identical."""

from __future__ import annotations

import json
from pathlib import Path

from specdec.bench import BenchConfig, run_bench, table

KEYS = {
    "plain_tokens_per_s",
    "spec_tokens_per_s",
    "speedup_vs_plain",
    "acceptance_rate",
    "mean_accepted_length",
    "outputs_identical",
    "distributed_tokens_per_s",
    "distributed_vs_embedded",
    "hf_plain_tokens_per_s",
    "hf_spec_tokens_per_s",
    "speedup_vs_hf_spec",
    "by_concurrency",
    "per_prompt",
}


def test_bench_all_configurations(tiny_models, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"kind": "copy", "prompt": "one two three four one two three four one two"},
                {"kind": "chat", "messages": [{"role": "user", "content": "Say hello."}]},
            ]
        )
    )
    cfg = BenchConfig(
        model=tiny_models[0],
        drafter="ngram",
        k=4,
        prompts=prompts,
        max_new_tokens=12,
        concurrency=[1, 2],
        distributed=True,
        compare_hf=True,
        plot=tmp_path / "bench.png",
    )
    result = run_bench(cfg)
    assert set(result) >= KEYS
    assert result["outputs_identical"] is True
    assert [r["concurrency"] for r in result["by_concurrency"]] == [1, 2]
    assert all(r["plain_tokens_per_s"] > 0 and r["spec_tokens_per_s"] > 0 for r in result["by_concurrency"])
    assert all(r["outputs_identical"] is True for r in result["by_concurrency"])
    assert len(result["per_prompt"]) == 2 and result["distributed_tokens_per_s"] > 0
    assert result["hf_spec_tokens_per_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "speculative, distributed" in table(result)
