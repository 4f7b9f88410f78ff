"""KV chunks on a Valkey of their own (SPECDEC_KV_REDIS_URL), real servers: the chunks land
there and nowhere else, registry and session records stay on the state server, and losing
the KV server (flushed, or killed) costs recomputation only: outputs stay identical to plain
decoding and every session record survives."""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

import pytest
import torch

from specdec.client import Client
from specdec.config import Settings
from specdec.core.runner import build_runner
from specdec.state.kv_store import store_for
from specdec_records import Keys, connect
from tests.conftest import ValkeyProcess
from tests.kvstore.conftest import start
from tests.kvstore.test_store import CHUNK, greedy, one_pass, tiny_model
from tests.reference import hf_greedy
from tests.waiting import wait_until


@pytest.fixture
def kv_valkey():
    """A second real valkey-server: the KV chunks' own."""
    server = ValkeyProcess()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def count(url: str, pattern: str) -> int:
    client = connect(url)
    try:
        return sum(1 for _ in client.scan_iter(pattern, count=1000))
    finally:
        client.close()


def test_settings_read_the_kv_url_and_default_to_the_state_server() -> None:
    env = {"SPECDEC_REDIS_URL": "redis://state:6379/0", "SPECDEC_KV_REDIS_URL": "redis://kv:6379/0"}
    assert Settings.from_env(env).kv_redis_url == "redis://kv:6379/0"
    assert Settings.from_env({"SPECDEC_REDIS_URL": "redis://state:6379/0"}).kv_redis_url == ""


def test_the_store_writes_and_restores_on_the_kv_server_only(redis_url, kv_valkey) -> None:
    """store_for with both URLs: every chunk goes to the KV server, none to the state one; a
    fresh replica restores from it exactly; a flushed KV server is a miss, still exact."""
    model = tiny_model(0)
    prompt = [int(t) for t in torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(5))]
    plain = greedy(one_pass(build_runner(model)), "plain", prompt, 12)
    settings = Settings(redis_url=redis_url, kv_redis_url=kv_valkey.url, redis_prefix="split:", kv_chunk_tokens=CHUNK)

    def replica():
        runner = build_runner(model)
        store = store_for(settings, "target", model, runner)
        assert store is not None
        return one_pass(runner, prefix_store=store), store

    worker, first = replica()
    assert greedy(worker, "a", prompt, 12) == plain
    assert first.flush(10) and first.stats.stored_chunks == (150 + 11) // CHUNK
    chunks = Keys("split:").kv_chunks("target")
    assert count(kv_valkey.url, chunks) == first.stats.stored_chunks
    assert count(redis_url, Keys("split:").everything()) == 0  # the state server holds no chunk
    worker, second = replica()
    assert greedy(worker, "b", prompt, 12) == plain
    assert second.stats.hit_chunks == 149 // CHUNK
    connect(kv_valkey.url).flushall()  # the cache evicted (or lost) everything: misses
    worker, third = replica()
    assert greedy(worker, "c", prompt, 12) == plain
    assert third.stats.hit_chunks == 0 and third.stats.missed_chunks == 1
    for store in (first, second, third):
        store.close()
    # Only the KV URL set: the store still has a server (the state URL may be empty: no registry).
    alone = Settings(kv_redis_url=kv_valkey.url, kv_chunk_tokens=CHUNK)
    runner = build_runner(model)
    only = store_for(alone, "target", model, runner)
    assert only is not None and only.redis.connection_pool.connection_kwargs["port"] == kv_valkey.port
    only.close()


def test_a_stack_survives_its_kv_server_flushed_and_killed(kv_models, valkey, kv_valkey) -> None:
    """Real processes: tiers on the session's Valkey (records) and a second one (chunks). The
    KV server flushed, then killed: outputs stay equal to plain greedy decoding, the session
    records made before are all still there, and chunks come back once a KV server does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(kv_models["target"], dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(21)
    prompts = [[int(t) for t in torch.randint(200, 20000, (3 * CHUNK + 5,), generator=gen)] for _ in range(3)]
    expected = [hf_greedy(model, p, 12) for p in prompts]
    stack = start(
        kv_models["target"],
        "none",
        valkey,
        targets=1,
        drafts=0,
        SPECDEC_KV_CHUNK_TOKENS=str(CHUNK),
        SPECDEC_KV_REDIS_URL=kv_valkey.url,
    )
    keys = Keys(stack.prefix)
    try:
        assert stack.kv_redis_url == kv_valkey.url and stack.redis_url == valkey.url

        def generate(prompt: list[int]) -> list[int]:
            with Client(stack.coordinator, timeout_s=120) as client:
                reply = client.complete(token_ids=prompt, max_new_tokens=12, ignore_eos=True, drafter="none")
            return list(reply.token_ids)

        assert generate(prompts[0]) == expected[0]
        wait_until(lambda: count(kv_valkey.url, keys.kv_chunks("target")) >= 3, timeout_s=10, what="chunks written")
        assert count(valkey.url, keys.kv_chunks("target")) == 0  # never on the state server
        assert count(kv_valkey.url, keys.sessions()) == 0 and count(kv_valkey.url, keys.replicas()) == 0
        sessions = count(valkey.url, keys.sessions())
        assert sessions >= 1 and count(valkey.url, keys.replicas("target")) == 1

        connect(kv_valkey.url).flushall()  # what allkeys-lru may do to any chunk: misses
        assert generate(prompts[0]) == expected[0]
        kv_valkey.stop()  # the KV server gone: the tier computes from memory
        assert generate(prompts[1]) == expected[1]
        assert generate(prompts[0]) == expected[0]
        assert count(valkey.url, keys.sessions()) >= sessions + 1  # every record kept, new ones written
        assert count(valkey.url, keys.replicas("target")) == 1  # still registered: routing unaffected

        kv_valkey.start()  # back, empty: the store recovers by itself (a short back-off)
        wait_until(
            lambda: generate(prompts[2]) == expected[2] and count(kv_valkey.url, keys.kv_chunks("target")) >= 3,
            timeout_s=30,
            what="chunks written to the restarted KV server",
        )
        target = next(c for c in stack.children if c.name == "target-0")
        assert "Traceback" not in target.log.read_text(errors="replace")
    finally:
        stack.stop()


def test_specdec_up_starts_a_noeviction_state_valkey_and_an_allkeys_lru_kv_one(tmp_path) -> None:
    """The launcher's embedded servers, real: records on noeviction with a small cap, chunks on
    allkeys-lru with the cache's cap, each with its own generated password; --one-valkey: one
    server for both (the old volatile-lru); URLs given: nothing started."""
    import redis

    from specdec import launcher

    stack = launcher.Stack(tmp_path)
    try:
        launcher.start_valkeys(stack, "", "", one_valkey=False)
        assert [c.name for c in stack.children] == ["valkey", "valkey-kv"]
        state, kv = connect(stack.redis_url), connect(stack.kv_redis_url)
        assert state.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert state.config_get("maxmemory") == {"maxmemory": str(128 << 20)}
        assert kv.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert kv.config_get("maxmemory") == {"maxmemory": str(1 << 30)}
        for url in (stack.redis_url, stack.kv_redis_url):  # a password each, and not the same one
            parts = urlsplit(url)
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(host=parts.hostname or "", port=parts.port or 0).ping()
        assert urlsplit(stack.redis_url).password != urlsplit(stack.kv_redis_url).password
        state.close()
        kv.close()
    finally:
        stack.stop()
    one = launcher.Stack(tmp_path)
    try:
        launcher.start_valkeys(one, "", "", one_valkey=True)
        assert [c.name for c in one.children] == ["valkey"] and one.kv_redis_url == one.redis_url
        assert connect(one.redis_url).config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    finally:
        one.stop()
    given = launcher.Stack(tmp_path)
    launcher.start_valkeys(given, "redis://state:1/0", "", one_valkey=False)
    assert (given.redis_url, given.kv_redis_url, given.children) == ("redis://state:1/0", "redis://state:1/0", [])
    launcher.start_valkeys(given, "redis://state:1/0", "redis://kv:1/0", one_valkey=False)
    assert given.kv_redis_url == "redis://kv:1/0" and given.children == []


def test_up_prints_the_kv_redis_url(monkeypatch, capsys) -> None:
    from specdec import cli, launcher

    asked = {}

    def fake_start_stack(*args, **kwargs):
        asked.update(kwargs)
        stack = launcher.Stack(log_dir=launcher.Path("/tmp"), redis_url="redis://s:1/0", kv_redis_url="redis://k:1/0")
        stack.coordinators, stack.coordinator = ["127.0.0.1:5000"], "127.0.0.1:5000"
        return stack

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher, "start_stack", fake_start_stack)
    monkeypatch.setattr(cli.time, "sleep", interrupt)
    assert cli.main(["up", "--model", "m", "--drafter", "ngram", "--one-valkey"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "redis: redis://s:1/0" in out and "kv-redis: redis://k:1/0" in out
    assert asked["one_valkey"] is True and asked["kv_redis_url"] == ""
