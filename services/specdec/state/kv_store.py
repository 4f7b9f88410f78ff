"""The shared KV tier in Redis: whole chunks of a session's cache, keyed by their prefix.

A cache is cut into chunks of `chunk_tokens` tokens. Chunk i's key is a hash chain over the
identity (model fingerprint, dtype, layout, tier, chunk size, format version) and the token
ids of chunks 0..i, so two sequences share chunk i exactly when they share everything up to
its end, in any process on any machine (blake2b, never Python's `hash()`). The value is one
Redis string: a small header (key, shape, dtype, version, MAC) and the raw tensor bytes
[layers, 2 (k, v), kv_heads, chunk_tokens, head_dim], so a half-written entry cannot exist.
The MAC is a keyed blake2b over the key, shape, dtype and bytes with a secret only the tiers
hold (SPECDEC_KV_SECRET): whoever else can write to Redis can neither alter a chunk nor
plant one under a key derived offline; either is a miss. Without a secret the MAC is a
plain checksum (corruption only), and the store says so at start.

Reads happen on the worker thread (they must land before the forward pass) and stop at the
first missing, evicted, corrupt or foreign chunk: a hit is always a prefix. Writes go through
a bounded queue to a background thread that pipelines them. Redis being down is a miss and a
dropped write, with a short back-off so a dead server costs the hot path nothing; the store
recovers by itself when the server returns. Entries carry a TTL; a byte budget beyond that is
Redis's own `maxmemory` + eviction policy (an evicted chunk is a miss, never an error). Chunks
may live on a server of their own (SPECDEC_KV_REDIS_URL, `allkeys-lru`): no one policy can
evict chunks and spare registry/session records when all of them carry a TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from specdec.core.kv_cache import SessionKV
from specdec_records import Keys, connect
from specdec_records.connect import KV

if TYPE_CHECKING:
    from specdec.config import Settings
    from specdec.core.runner import CausalLM, Runner

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: keyed MAC instead of a checksum
MAGIC = b"SDKV"
LAYOUT = "L2HTD"  # [layers, 2 (k, v), kv_heads, tokens, head_dim], contiguous
_HEADER = struct.Struct("<4sHI")  # magic, version, header length
MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class KVIdentity:
    """Everything besides the tokens that decides whether two caches are interchangeable."""

    model: str  # model fingerprint (architecture + weights), see model_fingerprint()
    dtype: str  # dtype of the cached tensors, e.g. "float32"
    layout: str  # payload tensor layout
    tier: str  # "target" | "draft"
    chunk_tokens: int  # tokens per chunk

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        for name in ("dtype", "layout", "tier"):
            if "|" in getattr(self, name):
                raise ValueError(f"{name} must not contain '|'")

    def seed(self) -> bytes:
        text = f"specdec-kv|v{FORMAT_VERSION}|{self.model}|{self.dtype}|{self.layout}|{self.tier}|{self.chunk_tokens}"
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def chunk_keys(self, tokens: list[int], count: int | None = None) -> list[ChunkKey]:
        """Keys of the first `count` (default: all) whole chunks of `tokens`."""
        n = self.chunk_tokens
        count = len(tokens) // n if count is None else min(count, len(tokens) // n)
        chain, keys = self.seed(), []
        for i in range(count):
            ids = struct.pack(f"<{n}I", *tokens[i * n : (i + 1) * n])
            chain = hashlib.blake2b(chain + ids, digest_size=16).digest()
            keys.append(ChunkKey(self.model, self.dtype, self.layout, self.tier, n, i, chain.hex()))
        return keys


@dataclass(frozen=True)
class ChunkKey:
    """One chunk's full identity; `chain` already hashes all the other fields and its tokens."""

    model: str
    dtype: str
    layout: str
    tier: str
    chunk_tokens: int
    index: int  # covers tokens [index * chunk_tokens, (index + 1) * chunk_tokens)
    chain: str  # hex blake2b chain over the identity and every token id up to the chunk's end

    def to_string(self) -> str:
        return "|".join(
            [self.model, self.dtype, self.layout, self.tier, str(self.chunk_tokens), str(self.index), self.chain]
        )

    @classmethod
    def from_string(cls, text: str) -> ChunkKey:
        model, dtype, layout, tier, n, index, chain = text.rsplit("|", 6)  # the model may contain '|'
        return cls(model, dtype, layout, tier, int(n), int(index), chain)

    def redis_key(self, prefix: str) -> str:
        return Keys(prefix).kv_chunk(self.tier, self.chain)


def chunk_mac(secret: bytes, key: ChunkKey, shape: list[int], dtype: str, body: bytes | memoryview) -> str:
    """Keyed blake2b (a MAC when `secret` is set) binding the bytes to their identity."""
    mac = hashlib.blake2b(key=secret[:64], digest_size=16)
    mac.update(json.dumps([key.to_string(), list(shape), dtype]).encode())
    mac.update(body)
    return mac.hexdigest()


def encode_chunk(key: ChunkKey, tensor: torch.Tensor, secret: bytes = b"") -> bytes:
    """Header + raw bytes of a [layers, 2, kv_heads, chunk_tokens, head_dim] tensor."""
    body = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    dtype = str(tensor.dtype).removeprefix("torch.")
    header = json.dumps(
        {
            "key": key.to_string(),
            "shape": list(tensor.shape),
            "dtype": dtype,
            "mac": chunk_mac(secret, key, list(tensor.shape), dtype, body),
        }
    ).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(header)) + header + body


def decode_chunk(
    raw: bytes, key: ChunkKey, shape: tuple[int, ...], dtype: torch.dtype, secret: bytes = b""
) -> torch.Tensor | None:
    """The chunk's tensor, or None if the payload is not exactly what `key` promises, or was
    not written by a holder of `secret`."""
    try:
        magic, version, size = _HEADER.unpack_from(raw)
        if magic != MAGIC or version != FORMAT_VERSION:
            return None
        header = json.loads(raw[_HEADER.size : _HEADER.size + size])
        body = memoryview(raw)[_HEADER.size + size :]
        name = str(dtype).removeprefix("torch.")
        if (
            header["key"] != key.to_string()
            or tuple(header["shape"]) != tuple(shape)
            or header["dtype"] != name
            or not hmac.compare_digest(chunk_mac(secret, key, list(shape), name, body), str(header["mac"]))
        ):
            return None
        flat = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        return flat.view(dtype).reshape(shape)
    except (ValueError, KeyError, TypeError, struct.error, RuntimeError):
        return None


def model_fingerprint(model: CausalLM) -> str:
    """A stable id for a model's architecture and weights (the same in every process)."""
    cfg = model.config
    fields = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_parameters",
        "max_position_embeddings",
    )
    digest = hashlib.blake2b(
        json.dumps({f: getattr(cfg, f, None) for f in fields}, sort_keys=True, default=str).encode(), digest_size=8
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return f"{getattr(cfg, 'model_type', 'model')}-{digest.hexdigest()}"


@dataclass
class KVStoreStats:
    """Counters; rates are computed where they are read."""

    lookups: int = 0  # restore calls that asked Redis
    hit_chunks: int = 0  # chunks restored
    restored_tokens: int = 0  # tokens of cache gained from Redis instead of recomputed
    missed_chunks: int = 0  # lookups that stopped at a missing (never written or evicted) chunk
    rejected_chunks: int = 0  # payloads refused: corrupt, other model/layout/version
    offered_chunks: int = 0  # chunks queued for writing
    stored_chunks: int = 0  # chunks written
    stored_bytes: int = 0
    dropped_chunks: int = 0  # not written: queue full or Redis down
    errors: int = 0  # Redis calls that failed
    available: bool = True  # False while backing off after a failure

    def as_load(self) -> dict[str, int | bool]:
        return {f"kv_{name}": value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class Lookup:
    """One restore that read Redis, for whoever watches (telemetry: a span and a histogram)."""

    start_ns: int  # wall clock, time.time_ns()
    end_ns: int
    hit_chunks: int
    restored_tokens: int


class RedisKVStore:
    """`specdec.core.prefix_store.PrefixStore` over Redis; see the module docstring."""

    on_lookup: Callable[[Lookup], None] | None = None  # called on the worker thread after each read

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        identity: KVIdentity,
        ttl_s: float = 3600.0,
        max_pending_bytes: int = 256 << 20,
        batch_chunks: int = 16,
        secret: bytes = b"",
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.prefix, self.identity, self.ttl_s = prefix, identity, ttl_s
        self.secret = secret
        if not secret:
            log.warning(
                "no SPECDEC_KV_SECRET: KV chunks in Redis carry a checksum, not a MAC; whoever can "
                "write to Redis can change what this tier computes from"
            )
        self.max_pending_bytes, self.batch_chunks = max_pending_bytes, batch_chunks
        # One quick retry (a connection broken by a server restart), no back-off sleeps on
        # the worker thread; our own back-off below keeps a dead server off the hot path.
        self.redis = connect(redis_url, KV, retry=Retry(NoBackoff(), 1))
        self.stats = KVStoreStats()
        self._offered: weakref.WeakKeyDictionary[SessionKV, int] = weakref.WeakKeyDictionary()
        self._queue: queue.Queue[tuple[ChunkKey, torch.Tensor, int] | None] = queue.Queue()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff_s = 0.25
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer", daemon=True)
        self._writer.start()

    # -- reads (worker thread) ---------------------------------------------------------

    def restore(self, tokens: list[int], kv: SessionKV) -> int:
        lookups, hits, start = self.stats.lookups, self.stats.hit_chunks, time.time_ns()
        restored = self._restore(tokens, kv)
        if self.on_lookup is not None and self.stats.lookups != lookups:
            self.on_lookup(Lookup(start, time.time_ns(), self.stats.hit_chunks - hits, restored))
        return restored

    def _restore(self, tokens: list[int], kv: SessionKV) -> int:
        n = self.identity.chunk_tokens
        if not kv.has_buffers or len(tokens) - kv.length < n or not self._available():
            return 0  # nothing a whole chunk could add (the usual decode step), or Redis is down
        first, last = kv.length // n, len(tokens) // n
        keys = self.identity.chunk_keys(tokens, last)[first:]
        self.stats.lookups += 1
        try:
            raws = self.redis.mget([key.redis_key(self.prefix) for key in keys])
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return 0
        self._recovered()
        pool = kv.pool
        assert pool is not None
        layers = pool.num_layers
        shape, dtype = (layers, 2, pool.num_kv_heads, n, pool.head_dim), pool.dtype
        chunks: list[torch.Tensor] = []
        for key, raw in zip(keys, raws):
            # bytes unless the client decodes responses (ours does not): a str is rejected
            tensor = decode_chunk(raw, key, shape, dtype, self.secret) if isinstance(raw, bytes) else None
            if tensor is None:
                if raw is None:
                    self.stats.missed_chunks += 1
                else:
                    self.stats.rejected_chunks += 1
                break
            chunks.append(tensor)
        if not chunks:
            return 0
        before, start = kv.length, first * n
        end = start + len(chunks) * n
        kv.truncate(start)
        kv.reserve(end)
        for j, tensor in enumerate(chunks):
            tensor = tensor.to(pool.device)
            for layer in range(layers):
                kv.write(layer, start + j * n, tensor[layer, 0], tensor[layer, 1])
        kv.commit(tokens[start:end])
        self._offered[kv] = end // n  # already in Redis: never written back
        self.stats.hit_chunks += len(chunks)
        self.stats.restored_tokens += end - before
        return end - before

    # -- writes (worker thread enqueues, writer thread sends) ------------------------------

    def offer(self, tokens: list[int], kv: SessionKV) -> None:
        if not kv.has_buffers:
            return
        n = self.identity.chunk_tokens
        complete = kv.common_prefix(tokens) // n
        done = self._offered.get(kv, 0)
        if complete <= done:
            if complete < done:  # rolled back below a chunk boundary
                self._offered[kv] = complete
            return
        if not self._available():
            return  # retried at a later step, once Redis is back
        self._offered[kv] = complete
        pool = kv.pool
        assert pool is not None  # has_buffers
        for key in self.identity.chunk_keys(tokens, complete)[done:]:
            s, e = key.index * n, (key.index + 1) * n
            tensor = torch.stack([torch.stack(kv.read(layer, s, e)) for layer in range(pool.num_layers)])
            size = tensor.numel() * tensor.element_size()
            with self._lock:
                if self._pending_bytes + size > self.max_pending_bytes:
                    self.stats.dropped_chunks += 1
                    continue
                self._pending_bytes += size
            self.stats.offered_chunks += 1
            self._queue.put((key, tensor, size))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < self.batch_chunks:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    self._queue.task_done()
                    break
                batch.append(nxt)
            self._write(batch)
            for _ in batch:
                self._queue.task_done()

    def _write(self, batch: list[tuple[ChunkKey, torch.Tensor, int]]) -> None:
        try:
            if not self._available():
                self.stats.dropped_chunks += len(batch)
                return
            payloads = [
                (key.redis_key(self.prefix), encode_chunk(key, tensor, self.secret)) for key, tensor, _ in batch
            ]
            pipe = self.redis.pipeline(transaction=False)
            for name, payload in payloads:
                pipe.set(name, payload, ex=max(1, int(self.ttl_s)))
            pipe.execute()
            self._recovered()
            self.stats.stored_chunks += len(batch)
            self.stats.stored_bytes += sum(len(p) for _, p in payloads)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            self.stats.dropped_chunks += len(batch)
        except Exception:  # never let the writer thread die
            log.exception("KV chunk write failed")
            self.stats.dropped_chunks += len(batch)
        finally:
            with self._lock:
                self._pending_bytes -= sum(size for _, _, size in batch)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued chunk is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        self._queue.put(None)
        self._writer.join(timeout=1.0)
        self.redis.close()

    # -- availability -------------------------------------------------------------------

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        if self.stats.available:
            log.warning("KV store: Redis unavailable (%s); computing from memory until it returns", exc)
        self.stats.available = False
        self._down_until = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)

    def _recovered(self) -> None:
        if not self.stats.available:
            log.warning("KV store: Redis is back")
        self.stats.available = True
        self._backoff_s = 0.25


def store_for(settings: Settings, tier: str, model: CausalLM, runner: Runner) -> RedisKVStore | None:
    """The tier's KV store when Redis is configured and the runner keeps per-layer buffers
    (the flattened runner; HF-cache runners are not stored). Chunks go to SPECDEC_KV_REDIS_URL
    when set: a server of their own can evict them (allkeys-lru) while the state server keeps
    registry and session records on noeviction."""
    url = settings.kv_redis_url or settings.redis_url
    if not url or settings.kv_chunk_tokens <= 0:
        return None
    kv = runner.new_kv()
    if not kv.has_buffers or kv.pool is None:  # (buffers live in a pool)
        return None
    identity = KVIdentity(
        model_fingerprint(model), str(kv.pool.dtype).removeprefix("torch."), LAYOUT, tier, settings.kv_chunk_tokens
    )
    return RedisKVStore(
        url,
        settings.redis_prefix,
        identity,
        settings.kv_ttl_s,
        int(settings.kv_max_pending_mb) << 20,
        secret=settings.kv_secret.encode(),
    )
