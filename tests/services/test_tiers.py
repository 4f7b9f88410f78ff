"""The three tiers as separate processes with a real Valkey: exactness, batching,
reproducibility, status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from specdec.client import AsyncClient, Client
from specdec_records import Keys, ReplicaRecord, connect
from tests.services.conftest import PROMPT, ngram_stream
from tests.waiting import eventually


def complete_ids(client: Client, prompt_ids: list[int], **params) -> tuple[list[int], object]:
    reply = client.complete(token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, adaptive=False, **params)
    return list(reply.token_ids), reply.stats


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_identical_to_plain_decoding_for_every_draft_length(
    tiny_stack, tiny_models, prompt_ids, reference, drafter
):
    name = "ngram" if drafter == "ngram" else f"model:{tiny_models[1]}"
    accepted = 0
    with Client(tiny_stack.address, timeout_s=120) as client:
        plain, plain_stats = complete_ids(client, prompt_ids, drafter="none")
        assert plain == reference
        assert plain_stats.proposed_tokens == 0
        for k in range(1, 9):
            ids, stats = complete_ids(client, prompt_ids, drafter=name, k=k)
            assert ids == reference, f"drafter {name} k={k}"
            assert stats.proposed_tokens > 0
            accepted += stats.accepted_tokens
    assert accepted > 0, "the drafter never had a token accepted: the test would not exercise acceptance"


def test_streaming_chunks_add_up_to_complete(tiny_stack, prompt_ids, reference):
    with Client(tiny_stack.address, timeout_s=120) as client:
        events = list(client.generate(token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, drafter="ngram"))
    chunks = [e.chunk for e in events if e.HasField("chunk")]
    assert events[-1].HasField("done") and sum(e.HasField("done") for e in events) == 1
    assert [t for c in chunks for t in c.token_ids] == reference
    assert events[-1].done.stats.generated_tokens == 24


def test_sampling_with_seed_is_reproducible(tiny_stack, tiny_models, prompt_ids):
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    with Client(tiny_stack.address, timeout_s=120) as client:
        runs = [complete_ids(client, prompt_ids, drafter=f"model:{tiny_models[1]}", k=4, **params)[0] for _ in range(2)]
        other_seed = complete_ids(client, prompt_ids, drafter=f"model:{tiny_models[1]}", k=4, **{**params, "seed": 99})[
            0
        ]
    assert runs[0] == runs[1]
    assert other_seed != runs[0]


async def test_eight_concurrent_streams_are_correct_and_batched(tiny_stack, prompt_ids, reference):
    async with AsyncClient(tiny_stack.address, timeout_s=120) as client:
        results = await asyncio.gather(*(ngram_stream(client, prompt_ids) for _ in range(8)))
    assert all(ids == reference for ids, _ in results)
    assert max(batch for _, batch in results) > 1.0, "the target never verified two sessions in one pass"


def test_status_lists_every_tier(tiny_stack, valkey):
    env = {"SPECDEC_REDIS_PREFIX": tiny_stack.prefix, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "status", "--redis-url", valkey.url, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    replicas = json.loads(out.stdout)["replicas"]
    assert {r["tier"] for r in replicas} == {"coordinator", "draft", "target"}
    assert all({"address", "pid", "model", "load"} <= set(r) for r in replicas)


def test_cli_generate_json_through_coordinator(tiny_stack):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "generate",
            PROMPT,
            "--coordinator",
            tiny_stack.address,
            "--max-new-tokens",
            "8",
            "--json",
            "--drafter",
            "ngram",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    reply = json.loads(out.stdout)
    assert len(reply["token_ids"]) == reply["stats"]["generated_tokens"] > 0
    assert {
        "proposed_tokens",
        "accepted_tokens",
        "acceptance_rate",
        "mean_accepted_length",
        "steps",
        "ttft_s",
        "tokens_per_s",
    } <= set(reply["stats"])
    assert reply["finish_reason"] in {"length", "stop"}


def test_registry_load_reports_throughput_and_acceptance(tiny_stack, tiny_models, prompt_ids, valkey):
    """The load the operator scales on: tokens/s and acceptance of the last interval."""
    import threading

    def load_the_tiers() -> None:  # keep generating while the heartbeats are read
        with Client(tiny_stack.address, timeout_s=120) as client:
            for _ in range(6):
                complete_ids(client, prompt_ids, drafter="ngram", k=4)

    worker = threading.Thread(target=load_the_tiers)
    worker.start()
    tiers = ("target", "coordinator")
    rates: dict[str, list[float]] = {t: [] for t in (*tiers, "draft")}  # the draft tier: tokens drafted
    acceptance: dict[str, list[float]] = {t: [] for t in tiers}
    store = connect(valkey.url)

    def every_tier_reported() -> None:  # the records live in Redis: read them until all have reported
        for key in store.scan_iter(Keys(tiny_stack.prefix).replicas()):
            raw = store.get(key)
            record = ReplicaRecord.from_json(raw) if raw is not None else None
            if record is not None and record.tier in rates:
                if record.load.tokens_per_s > 0:
                    rates[record.tier].append(record.load.tokens_per_s)
                if record.load.acceptance_rate is not None and record.tier in tiers:
                    acceptance[record.tier].append(record.load.acceptance_rate)
        assert all(rates.values()) and all(acceptance.values()), (rates, acceptance)

    try:
        eventually(every_tier_reported, timeout_s=10)
    finally:
        store.close()
        worker.join()
    assert all(0.0 <= a <= 1.0 for values in acceptance.values() for a in values)
