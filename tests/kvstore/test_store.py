"""The Redis KV tier in-process against a real Valkey: deterministic keys, exact restores, a
hit is always a prefix, foreign/corrupt/evicted chunks are misses, Redis outages cost
nothing but recomputation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from specdec.core.batcher import NotYet
from specdec.core.runner import build_runner
from specdec.core.sampling import SamplingParams
from specdec.core.target import TargetWorker
from specdec.core.types import Verdict, VerifyItem
from specdec.state.kv_store import LAYOUT, ChunkKey, KVIdentity, RedisKVStore, model_fingerprint
from specdec_records import connect
from tests.conftest import ValkeyProcess

CHUNK = 32
KEY_SCRIPT = """
import json, sys
from specdec.state.kv_store import KVIdentity
ident = KVIdentity("llama-0123abcd", "float32", "L2HTD", "target", 32)
print(json.dumps([k.to_string() for k in ident.chunk_keys(list(range(1000, 1100)))]))
"""


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def models():
    return tiny_model(0), tiny_model(1)


def make_store(url: str, prefix: str, model, tier: str = "target") -> RedisKVStore:
    identity = KVIdentity(model_fingerprint(model), "float32", LAYOUT, tier, CHUNK)
    return RedisKVStore(url, prefix, identity, ttl_s=60)


def one_pass(runner, prefix_store: RedisKVStore | None = None) -> TargetWorker:
    """A target worker that prefills a prompt in one pass: each prompt is one store lookup,
    so the counts below are those of a single restore (chunked prefill has its own tests)."""
    return TargetWorker(runner, prefix_store=prefix_store, prefill_chunk_s=0)


def greedy(worker: TargetWorker, session: str, prompt: list[int], n: int) -> list[int]:
    """Plain decoding through the worker (no drafts), the delta protocol as the loop uses it."""
    tokens, synced, out = list(prompt), 0, []
    for _ in range(n):
        item = VerifyItem(session, synced, tokens[synced:], [], None, SamplingParams())
        verdict = worker.verify_batch([item])[0]
        while isinstance(verdict, NotYet):  # a chunked prefill: the batcher would run it again
            verdict = worker.verify_batch([item])[0]
        assert isinstance(verdict, Verdict), verdict
        synced = len(tokens) + len(verdict.tokens)
        tokens += verdict.tokens
        out += verdict.tokens
    return out


def test_keys_are_identical_in_two_processes_and_round_trip():
    runs = []
    for seed in ("1", "2"):  # different PYTHONHASHSEED: Python's hash() would differ
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", KEY_SCRIPT], capture_output=True, text=True, env=env, check=True, timeout=120
        )
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1] and len(runs[0]) == 100 // 32
    key = ChunkKey.from_string(runs[0][2])
    assert key.to_string() == runs[0][2] and key.index == 2 and key.tier == "target"
    assert ChunkKey.from_string("a|b|model|float32|L2HTD|draft|32|0|ff").model == "a|b|model"
    here = KVIdentity("llama-0123abcd", "float32", "L2HTD", "target", 32).chunk_keys(list(range(1000, 1100)))
    assert [k.to_string() for k in here] == runs[0]
    other = KVIdentity("llama-0123abcd", "float32", "L2HTD", "draft", 32).chunk_keys(list(range(1000, 1100)))
    assert all(a.chain != b.chain for a, b in zip(here, other))
    # A chain: chunk 1's key depends on chunk 0's tokens.
    changed = KVIdentity("llama-0123abcd", "float32", "L2HTD", "target", 32).chunk_keys([7] + list(range(1001, 1100)))
    assert all(a.chain != b.chain for a, b in zip(here, changed))


def test_another_replica_restores_the_prefix_exactly(models, redis_url):
    model = models[0]
    prompt = [int(t) for t in torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(5))]
    plain = greedy(one_pass(build_runner(model)), "plain", prompt, 12)

    first = make_store(redis_url, "t1:", model)
    assert greedy(one_pass(build_runner(model), prefix_store=first), "a", prompt, 12) == plain
    assert first.flush(10) and first.stats.stored_chunks == (150 + 11) // CHUNK
    second = make_store(redis_url, "t1:", model)  # a fresh "replica"
    worker = one_pass(build_runner(model), prefix_store=second)
    assert greedy(worker, "b", prompt, 12) == plain
    assert second.stats.hit_chunks == 149 // CHUNK and second.stats.restored_tokens == 4 * CHUNK
    assert second.stats.stored_chunks == 0 or second.flush(10)


def test_chunks_of_another_model_are_never_used(models, redis_url):
    a, b = models
    prompt = list(range(3, 103))
    store_a = make_store(redis_url, "t2:", a)
    greedy(one_pass(build_runner(a), prefix_store=store_a), "a", prompt, 2)
    assert store_a.flush(10) and store_a.stats.stored_chunks == 3
    store_b = make_store(redis_url, "t2:", b)
    assert store_a.identity.model != store_b.identity.model
    plain_b = greedy(one_pass(build_runner(b)), "plain", prompt, 6)
    assert greedy(one_pass(build_runner(b), prefix_store=store_b), "b", prompt, 6) == plain_b
    assert store_b.stats.hit_chunks == 0 and store_b.stats.missed_chunks == 1
    # Even a payload of model A planted under model B's key is refused (header check).
    client = connect(redis_url)
    for ka, kb in zip(store_a.identity.chunk_keys(prompt), store_b.identity.chunk_keys(prompt)):
        client.set(kb.redis_key("t2:"), client.get(ka.redis_key("t2:")))
    worker = one_pass(build_runner(b), prefix_store=store_b)
    assert greedy(worker, "b2", prompt, 6) == plain_b
    assert store_b.stats.hit_chunks == 0 and store_b.stats.rejected_chunks == 1


def test_corrupt_and_evicted_chunks_are_misses_and_a_hit_is_a_prefix(models, redis_url):
    model = models[0]
    prompt = list(range(10, 160))  # 4 whole chunks before the last token
    store = make_store(redis_url, "t3:", model)
    plain = greedy(one_pass(build_runner(model), prefix_store=store), "w", prompt, 4)
    assert store.flush(10)
    keys = [k.redis_key("t3:") for k in store.identity.chunk_keys(prompt)]
    client = connect(redis_url)
    client.delete(keys[2])  # evicted
    reader = make_store(redis_url, "t3:", model)
    assert greedy(one_pass(build_runner(model), prefix_store=reader), "r1", prompt, 4) == plain
    assert reader.stats.hit_chunks == 2 and reader.stats.missed_chunks == 1
    raw = bytearray(client.get(keys[1]))
    raw[-5] ^= 0xFF  # a flipped byte in the tensor data
    client.set(keys[1], bytes(raw))
    reader = make_store(redis_url, "t3:", model)
    assert greedy(one_pass(build_runner(model), prefix_store=reader), "r2", prompt, 4) == plain
    assert reader.stats.hit_chunks == 1 and reader.stats.rejected_chunks == 1


def test_redis_down_costs_only_recomputation_and_recovers(models):
    model = models[0]
    server = ValkeyProcess()
    server.start()
    try:
        store = make_store(server.url, "t4:", model)
        prompt = list(range(20, 120))
        plain = greedy(one_pass(build_runner(model)), "plain", prompt, 4)
        server.stop()
        worker = one_pass(build_runner(model), prefix_store=store)
        assert greedy(worker, "down", prompt, 4) == plain  # nothing raises
        assert not store.stats.available and store.stats.errors >= 1 and store.stats.stored_chunks == 0
        server.start()
        store._down_until = 0.0  # skip the back-off wait
        assert greedy(worker, "up", prompt, 4) == plain
        assert store.flush(10) and store.stats.available and store.stats.stored_chunks == 3
        fresh = make_store(server.url, "t4:", model)
        assert greedy(one_pass(build_runner(model), prefix_store=fresh), "again", prompt, 4) == plain
        assert fresh.stats.hit_chunks == 3
    finally:
        server.stop()


def test_chunks_not_written_by_a_secret_holder_are_misses(models, redis_url):
    """With a shared secret the chunks carry a MAC: a chunk altered in Redis with a
    recomputed checksum, or planted under a key derived offline, is a miss; the output is
    the plain one either way."""
    from specdec.state.kv_store import decode_chunk, encode_chunk

    model, secret = models[0], b"the tiers' secret"
    prompt = list(range(40, 190))
    identity = KVIdentity(model_fingerprint(model), "float32", LAYOUT, "target", CHUNK)
    writer = RedisKVStore(redis_url, "t5:", identity, ttl_s=60, secret=secret)
    plain = greedy(one_pass(build_runner(model), prefix_store=writer), "w", prompt, 4)
    assert writer.flush(10) and writer.stats.stored_chunks == 4
    client = connect(redis_url)
    keys = identity.chunk_keys(prompt)
    shape = (2, 2, 2, CHUNK, 16)  # layers, k/v, kv heads, tokens, head dim of the tiny model
    genuine = decode_chunk(client.get(keys[0].redis_key("t5:")), keys[0], shape, torch.float32, secret)
    assert genuine is not None
    # An outsider alters chunk 1 and re-encodes it as well as it can: without the secret.
    altered = decode_chunk(client.get(keys[1].redis_key("t5:")), keys[1], shape, torch.float32, secret) + 1.0
    client.set(keys[1].redis_key("t5:"), encode_chunk(keys[1], altered))
    reader = RedisKVStore(redis_url, "t5:", identity, ttl_s=60, secret=secret)
    assert greedy(one_pass(build_runner(model), prefix_store=reader), "r", prompt, 4) == plain
    assert reader.stats.hit_chunks == 1 and reader.stats.rejected_chunks == 1
    # A prefix never computed, planted under the key anyone can derive from the tokens.
    planted = [t % 256 for t in range(300, 450)]
    for key in identity.chunk_keys(planted):
        client.set(key.redis_key("t5:"), encode_chunk(key, torch.zeros(shape), b"a guessed secret"))
    fresh = RedisKVStore(redis_url, "t5:", identity, ttl_s=60, secret=secret)
    plain_planted = greedy(one_pass(build_runner(model)), "p0", planted, 4)
    assert greedy(one_pass(build_runner(model), prefix_store=fresh), "p", planted, 4) == plain_planted
    assert fresh.stats.hit_chunks == 0 and fresh.stats.rejected_chunks == 1
    client.close()
