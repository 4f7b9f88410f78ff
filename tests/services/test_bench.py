"""`specdec bench` end to end on the tiny models: every configuration runs, the JSON has
the documented keys, and greedy outputs of all configurations are identical; Spec-Bench's
format, the per-category sample and rows, the multi-turn traces, and transformers as a
peer in its own process."""

from __future__ import annotations

import json
from pathlib import Path

from specdec.benchmarks.bench import BenchConfig, run_bench, table
from specdec.benchmarks.bench_prompts import MULTITURN, TRACES, Trace, as_prompt, load_prompts

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
    "hf_lookup_tokens_per_s",
    "hf_lookup_best",
    "hf_outputs_identical",
    "by_concurrency",
    "by_category",
    "by_drafter",
    "per_prompt",
}
CATEGORIES = ("writing", "coding", "translation")


def test_bench_all_configurations(tiny_models: tuple[str, str], tmp_path: Path) -> None:
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
    assert result["outputs_identical"] is True and result["hf_outputs_identical"] is True
    assert [r["concurrency"] for r in result["by_concurrency"]] == [1, 2]
    assert all(r["plain_tokens_per_s"] > 0 and r["spec_tokens_per_s"] > 0 for r in result["by_concurrency"])
    assert all(r["outputs_identical"] is True for r in result["by_concurrency"])
    assert len(result["per_prompt"]) == 2 and result["distributed_tokens_per_s"] > 0
    assert result["hf_spec_tokens_per_s"] > 0
    assert [c["category"] for c in result["by_category"]] == ["copy", "chat"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "speculative, distributed" in table(result)


def _spec_bench_file(path: Path) -> Path:
    """Spec-Bench's format: three questions in each of three categories, one with two turns."""
    lines = []
    for c, category in enumerate(CATEGORIES):
        for q in range(3):
            turns = [f"{category} question {q}: repeat the words red green blue red green blue."]
            turns += ["Now say it again."] if q == 0 else []
            lines.append(json.dumps({"question_id": 10 * c + q, "category": category, "turns": turns}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_per_category_sample_is_seeded(tmp_path: Path) -> None:
    path = _spec_bench_file(tmp_path / "spec_bench.jsonl")
    every = load_prompts(path)
    assert len(every) == 9 and all(isinstance(r, dict) and len(r["messages"]) == 1 for r in every)
    draws = [[r["id"] for r in load_prompts(path, per_category=2, seed=s) if isinstance(r, dict)] for s in range(6)]
    assert draws[0] == [r["id"] for r in load_prompts(path, per_category=2, seed=0) if isinstance(r, dict)]
    assert all(len(d) == 6 and sorted(d) == d for d in draws)  # two of each category, in file order
    assert len({tuple(d) for d in draws}) > 1  # the seed picks which
    assert [r["id"] for r in load_prompts(path, kinds=["coding"]) if isinstance(r, dict)] == [10, 11, 12]
    mixed = load_prompts(f"{path},{MULTITURN}", per_category=1)
    assert len(mixed) == 4 and isinstance(mixed[-1], Trace)


def test_trace_turns_quote_the_answers() -> None:
    trace = TRACES[0]
    assert trace.turns == 3
    row = trace.row(2, ["FIRST ANSWER", "SECOND {ANSWER} }{"])
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert "FIRST ANSWER" in row["messages"][2]["content"] and "SECOND {ANSWER} }{" in row["messages"][4]["content"]
    plain = as_prompt(row, has_chat_template=False)
    assert "messages" not in plain and plain["prompt"].count("ANSWER") == 4 and plain["turn"] == 2


def test_bench_spec_bench_and_multiturn(tiny_models: tuple[str, str], tmp_path: Path) -> None:
    """Per-category rows for a Spec-Bench sample and the traces, two drafters side by side,
    and the peer's prompt lookup at each setting and assisted generation."""
    path = _spec_bench_file(tmp_path / "spec_bench.jsonl")
    cfg = BenchConfig(
        model=tiny_models[0],
        drafter=f"ngram,model:{tiny_models[1]}",
        k=4,
        prompts=f"{path},{MULTITURN}",
        max_new_tokens=10,
        concurrency=[],
        compare_hf=True,
        per_category=1,
        seed=3,
        plot=tmp_path / "bench.png",
    )
    result = run_bench(cfg)
    assert result["outputs_identical"] is True and result["hf_outputs_identical"] is True
    categories = {c["category"]: c for c in result["by_category"]}
    assert list(categories) == [*CATEGORIES, MULTITURN]
    assert [c["prompts"] for c in categories.values()] == [1, 1, 1, TRACES[0].turns]
    assert all(set(c["by_drafter"]) == set(cfg.drafters) for c in categories.values())
    assert set(result["hf_lookup_tokens_per_s"]) == {"3", "5", "10"}
    assert result["hf_prompt_lookup_tokens_per_s"] == max(result["hf_lookup_tokens_per_s"].values())
    assert result["hf_assisted_tokens_per_s"] > 0
    assert result["speedup_vs_hf_lookup_median"] > 0 and result["by_drafter"]["ngram"]["median_prompt_speedup"] > 0
    turns = [e for e in result["per_prompt"] if e["kind"] == MULTITURN]
    assert [e["turn"] for e in turns] == [0, 1, 2]
    for before, after in zip(turns, turns[1:], strict=False):
        if after["turn"]:  # the next turn's prompt holds the answer before it (in the chat, and quoted)
            assert after["prompt_tokens"] >= before["prompt_tokens"] + before["tokens"]
    text = table(result)
    assert all(name in text for name in [*CATEGORIES, MULTITURN, "transformers prompt lookup 10"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
