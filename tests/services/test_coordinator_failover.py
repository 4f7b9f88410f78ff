"""Coordinator failover with real processes and a real Valkey: two coordinators on one
Redis; a client given both resumes its streams on the survivor when the one serving them is
killed with -9, and every output is the uninterrupted one (greedy and seeded sampling). A
request_id names one request: a finished one answers its result again, two coordinators
given it at once run it once, a malformed record is a miss."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from specdec.client import AsyncClient, Client, make_request
from specdec.launcher import start_stack, wait_healthy
from specdec.v1 import generation_pb2, generation_pb2_grpc
from specdec_records import Keys, connect
from tests.conftest import free_port

NUM_STREAMS = 20
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def stack(tiny_models, valkey):
    prefix = f"specdec-coord-{uuid.uuid4().hex[:6]}:"
    env = {
        "SPECDEC_REDIS_PREFIX": prefix,
        "SPECDEC_TORCH_THREADS": "1",
        "SPECDEC_HEARTBEAT_S": "0.5",
        # Each verify step 20 ms slower, so the kill always lands while every stream is mid-flight.
        "SPECDEC_FAILPOINTS": "verify_batch=sleep@20",
    }
    with pytest.MonkeyPatch.context() as patch:  # the launcher's registry wait reads the prefix too
        patch.setenv("SPECDEC_REDIS_PREFIX", prefix)
        running = start_stack(
            tiny_models[0], "ngram", 1, 1, free_port(), valkey.url, extra_env=env, coordinator_replicas=2
        )
    running.prefix = prefix  # type: ignore[attr-defined]
    yield running
    running.stop()


def coordinators(stack) -> list:
    """Two live coordinators, whichever tests ran before (one killed before is replaced)."""
    live = [c for c in stack.children if c.name.startswith("coordinator") and c.proc.poll() is None]
    while len(live) < 2:
        port = free_port()
        name = f"coordinator-{sum(c.name.startswith('coordinator') for c in stack.children)}"
        child = stack.spawn(
            name,
            [sys.executable, "-m", "specdec.cli", "serve", "coordinator", "--port", str(port)],
            stack.env,
            f"127.0.0.1:{port}",
        )
        wait_healthy(child)
        live.append(child)
    return live[:2]


def workload(prompt_ids: list[int]) -> list[dict]:
    """Greedy and seeded sampling (fixed draft length: the same seed then gives the same
    tokens) alternating, on prompts that differ in where they start."""
    requests = []
    for i in range(NUM_STREAMS):
        params = dict(token_ids=prompt_ids[i % 5 :], max_new_tokens=NEW_TOKENS, ignore_eos=True, drafter="ngram", k=3)
        if i % 2:
            params.update(temperature=0.8, top_p=0.95, seed=1000 + i, adaptive=False)
        requests.append(params)
    return requests


async def run_streams(addresses: list[str], requests: list[dict], fault=None, fault_after: int = 1):
    """Every request streamed at once through one client given `addresses`; `fault()` is
    called once each stream has `fault_after` tokens. -> ([(ids, text, finish, done count,
    generated)], seconds from the fault to each stream's next chunk)."""
    progress = [0] * len(requests)
    after_fault: list[float | None] = [None] * len(requests)
    all_streaming = asyncio.Event()
    fault_at: list[float] = []

    async def one(i: int, params: dict):
        ids, text, dones, finish, generated = [], "", 0, None, 0
        async for event in client.generate(**params):
            if event.HasField("chunk"):
                if fault_at and after_fault[i] is None:
                    after_fault[i] = time.perf_counter() - fault_at[0]
                ids += event.chunk.token_ids
                text += event.chunk.text
                progress[i] = len(ids)
                if min(progress) >= fault_after:
                    all_streaming.set()
            else:
                dones += 1
                finish, generated = event.done.finish_reason, event.done.stats.generated_tokens
        return ids, text, finish, dones, generated

    async with AsyncClient(addresses, timeout_s=180) as client:
        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(requests)]
        if fault is not None:
            streaming = asyncio.create_task(all_streaming.wait())
            await asyncio.wait([streaming, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done():  # a stream ended before every one had started
                streaming.cancel()
                await asyncio.gather(*tasks)  # raises what failed
            assert max(progress) < NEW_TOKENS, "a stream finished before the fault: nothing would be tested"
            fault_at.append(time.perf_counter())
            fault()
        outputs = await asyncio.gather(*tasks)
    return outputs, [s for s in after_fault if s is not None]


async def test_kill_coordinator_mid_stream_every_stream_completes_identically(stack, prompt_ids):
    victim, survivor = coordinators(stack)
    requests = workload(prompt_ids)
    reference, _ = await run_streams([victim.address, survivor.address], requests)
    assert all(len(ids) == NEW_TOKENS and dones == 1 for ids, _, _, dones, _ in reference)

    outputs, stalls = await run_streams([victim.address, survivor.address], requests, victim.proc.kill, fault_after=6)
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    print(
        f"\n[kill -9 coordinator] {len(stalls)} streams; time from the kill to their next chunk: "
        f"median {sorted(stalls)[len(stalls) // 2]:.3f} s, max {max(stalls):.3f} s"
    )
    for i, (got, want) in enumerate(zip(outputs, reference)):
        assert got[:4] == want[:4], f"stream {i} ({'sampled' if i % 2 else 'greedy'}) differs after failover"
        assert got[4] == NEW_TOKENS, "the resumed request's statistics count the whole request"
    # Each request was continued in its own record (not started anew beside it): none of
    # the killed coordinator's records is left unfinished.
    left = [r for r in records(stack) if r.get("owner", "").startswith(victim.address + "/") and r["state"] != "done"]
    assert not left, f"{len(left)} requests of the killed coordinator were not continued from their records"


def records(stack) -> list[dict]:
    db = connect(stack.redis_url)
    try:
        raw = [db.get(key) for key in db.scan_iter(Keys(stack.prefix).sessions())]
    finally:
        db.close()
    found = []
    for value in raw:
        with contextlib.suppress(ValueError, TypeError):
            if isinstance(record := json.loads(value or b""), dict) and "state" in record:
                found.append(record)
    return found


def complete_ids(address: str, **params) -> list[int]:
    with Client(address, timeout_s=120) as client:
        return list(client.complete(**params).token_ids)


def test_a_finished_request_id_answers_its_result_not_a_new_generation(stack, prompt_ids):
    a, b = coordinators(stack)
    # Sampling without a seed: a new generation would draw a new seed and other tokens.
    params = dict(
        token_ids=prompt_ids, max_new_tokens=16, ignore_eos=True, temperature=1.0, request_id=f"done-{uuid.uuid4().hex}"
    )
    first = complete_ids(a.address, **params)
    assert complete_ids(a.address, **params) == first
    assert complete_ids(b.address, **params) == first
    with Client(b.address, timeout_s=120) as client:
        events = list(client.generate(**params))
    assert [t for e in events if e.HasField("chunk") for t in e.chunk.token_ids] == first
    assert sum(e.HasField("done") for e in events) == 1
    other = complete_ids(a.address, **{**params, "request_id": f"other-{uuid.uuid4().hex}"})
    assert other != first, "a new request_id must generate anew"


async def test_one_request_id_sent_to_two_coordinators_runs_once(stack, prompt_ids):
    a, b = coordinators(stack)
    params = dict(
        token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, temperature=1.0, request_id=f"race-{uuid.uuid4().hex}"
    )

    async def complete(address: str) -> list[int]:
        async with AsyncClient(address, timeout_s=120) as client:
            return list((await client.complete(**params)).token_ids)

    first, second = await asyncio.gather(complete(a.address), complete(b.address))
    assert first == second, "two coordinators each ran the request (each drew its own seed)"


async def test_a_stream_resumed_elsewhere_while_its_coordinator_lives_waits_for_it_to_let_go(stack, prompt_ids):
    """The client's connection broke but its coordinator lives: the other one waits for
    the lease (the first notices its client left, writes its record, lets go) and then
    continues the request; sampled without a seed, so a second run would show."""
    a, b = coordinators(stack)
    params = dict(
        token_ids=prompt_ids,
        max_new_tokens=48,
        ignore_eos=True,
        temperature=1.0,
        drafter="ngram",
        request_id=f"back-{uuid.uuid4().hex}",
    )
    request = make_request(generation_pb2.GenerateRequest, **params)
    held: list[int] = []
    async with grpc.aio.insecure_channel(a.address) as first, grpc.aio.insecure_channel(b.address) as second:
        call = generation_pb2_grpc.GenerationServiceStub(first).Generate(request, timeout=120)
        async for event in call:
            held += event.chunk.token_ids
            if len(held) >= 4:
                break
        call.cancel()  # the connection "dropped"; coordinator a may not have noticed yet
        request.resume_from = len(held)
        rest = [
            t
            async for e in generation_pb2_grpc.GenerationServiceStub(second).Generate(request, timeout=120)
            if e.HasField("chunk")
            for t in e.chunk.token_ids
        ]
    assert len(held) + len(rest) == 48
    # One run, not two: the finished request answers exactly what the client got (a second
    # run would have drawn another seed, and other tokens).
    async with AsyncClient(b.address, timeout_s=120) as client:
        assert list((await client.complete(**params)).token_ids) == held + rest


def test_resume_from_without_a_record_regenerates_and_skips_what_the_client_holds(stack, prompt_ids):
    a, _ = coordinators(stack)
    params = dict(token_ids=prompt_ids, max_new_tokens=16, ignore_eos=True, drafter="ngram")
    with Client(a.address, timeout_s=120) as client:
        whole = list(client.generate(**params, request_id=f"whole-{uuid.uuid4().hex}"))
    ids = [t for e in whole if e.HasField("chunk") for t in e.chunk.token_ids]
    chunks = [e.chunk for e in whole if e.HasField("chunk")]
    held = len(chunks[0].token_ids)  # a client that got the first chunk only
    request = make_request(generation_pb2.GenerateRequest, **params, request_id=f"gone-{uuid.uuid4().hex}")
    request.resume_from = held
    with grpc.insecure_channel(a.address) as channel:
        rest = list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=120))
        assert [t for e in rest if e.HasField("chunk") for t in e.chunk.token_ids] == ids[held:]
        assert chunks[0].text + "".join(e.chunk.text for e in rest if e.HasField("chunk")) == "".join(
            c.text for c in chunks
        )
        # Unseeded sampling: the held tokens' seed is gone with the record; say so.
        request = make_request(
            generation_pb2.GenerateRequest, **params, temperature=1.0, request_id=f"lost-{uuid.uuid4().hex}"
        )
        request.resume_from = 3
        with pytest.raises(grpc.RpcError) as err:
            list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=120))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_malformed_record_is_a_miss_never_a_crash(stack, prompt_ids):
    from specdec.coordinator.resume import fingerprint
    from specdec.coordinator.service import spec_from_proto
    from specdec.state.sessions import request_digest

    a, _ = coordinators(stack)
    params = dict(token_ids=prompt_ids, max_new_tokens=8, ignore_eos=True, drafter="none")
    expected = complete_ids(a.address, **params)
    db, keys = connect(stack.redis_url), Keys(stack.prefix)
    try:
        for n, (index, record) in enumerate(
            [
                ("not-a-record-id\n\x00", None),
                ("r1", b"{not json"),
                ("r2", json.dumps({"v": 1, "state": "running"})),
                ("r3", json.dumps({"v": 1, "prompt_ids": [10**9]})),
            ]
        ):
            request_id = f"bad-{n}-{uuid.uuid4().hex}"
            spec = spec_from_proto(make_request(generation_pb2.CompleteRequest, **params, request_id=request_id))
            digest = request_digest(request_id, fingerprint(spec))
            db.set(keys.request(digest), index)
            if record is not None:
                db.set(keys.session(index), record)
            assert complete_ids(a.address, **params, request_id=request_id) == expected
    finally:
        db.close()
    assert a.proc.poll() is None


def test_cli_generate_takes_several_coordinators(stack):
    _, b = coordinators(stack)
    dead = f"127.0.0.1:{free_port()}"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "generate",
            "hello there",
            "--coordinator",
            f"{dead},{b.address}",
            "--max-new-tokens",
            "4",
            "--json",
            "--drafter",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["stats"]["generated_tokens"] > 0


def test_up_prints_one_line_per_coordinator(monkeypatch, capsys):
    """`specdec up --coordinator-replicas 2` asks the launcher for two and prints each."""
    from specdec import cli, launcher

    asked = {}

    def fake_start_stack(*args, coordinator_replicas: int = 1, **kwargs):
        asked["coordinators"] = coordinator_replicas
        stack = launcher.Stack(log_dir=launcher.Path("/tmp"), redis_url="redis://x:1/0")
        stack.coordinators = [f"127.0.0.1:{5000 + i}" for i in range(coordinator_replicas)]
        stack.coordinator = stack.coordinators[0]
        return stack

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher, "start_stack", fake_start_stack)
    monkeypatch.setattr(cli.time, "sleep", interrupt)
    assert cli.main(["up", "--coordinator-replicas", "2", "--model", "m", "--drafter", "ngram"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("coordinator: ")]
    assert asked["coordinators"] == 2 and lines == ["coordinator: 127.0.0.1:5000", "coordinator: 127.0.0.1:5001"]
