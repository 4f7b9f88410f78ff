"""Session records in Redis: what a coordinator needs to resume or inspect a request.

The record (:class:`~specdec_records.SessionRecord`), its index entry and the lease key are
named in `specdec_records` (``Keys.session``, ``Keys.request``, ``Keys.lease``):

* the record: the request's prompt and committed tokens, sampling parameters with the seed
  actually used, drafter, stop conditions, state (`queued` / `running` / `done`), finish
  reason and statistics;
* the index ``request_digest(request_id, fingerprint)`` -> record id: finds a request's
  record by its `request_id` (the digest covers the request's own fingerprint too, so the
  same id on a different request is a different request);
* the lease -> owner: the one coordinator running the request now (`SET NX PX`, refreshed
  while it runs, compare-and-set to take over from a dead owner).

Records are written by a task of their own: at most one write in flight per session, the
latest state wins. The coordinator lets a chunk go to its client once the record holding
it is written (`settled`, bounded: a slow or absent Redis only costs the record, never the
request), so a record is rarely behind what a client holds. Whatever is read back is
checked field by field; a record that is not well formed is a miss (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from specdec_records import SESSION_TTL_S, Keys, RecordError, SessionRecord, connect_async, request_digest
from specdec_records.session import MAX_ID_CHARS

log = logging.getLogger(__name__)
__all__ = ["LEASE_TTL_S", "SESSION_TTL_S", "SETTLE_WAIT_S", "Leases", "SessionRecord", "SessionStore", "request_digest"]
SETTLE_WAIT_S = 0.25  # longest a chunk waits for its record; none wait while writes are failing
LEASE_TTL_S = 10.0  # a lease nobody refreshes (its owner frozen or cut off) expires after this
LEASE_REFRESH_S = LEASE_TTL_S / 4

# Compare-and-set on a lease: only its holder may extend or drop it, and a taker names the
# holder it found dead (two coordinators racing for one orphan: one wins).
# Keeping a lease also retakes one that vanished (a restarted Redis): it is lost only when
# another owner holds it.
_KEEP = (
    "local v = redis.call('GET', KEYS[1]) if v == false or v == ARGV[1] then "
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0"
)
_DROP = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_TAKE = (
    "local v = redis.call('GET', KEYS[1]) if v == false or v == ARGV[1] then "
    "redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0"
)


class SessionStore:
    def __init__(self, redis_url: str, prefix: str = "specdec:") -> None:
        self.prefix, self.keys = prefix, Keys(prefix)
        self.redis = connect_async(redis_url)
        self._latest: dict[str, tuple[SessionRecord | dict[str, Any], str | None]] = {}  # id -> (record, index)
        self._writing: dict[str, asyncio.Event] = {}  # record id -> set when its writes have settled
        self.failing = False  # the last write failed or was slow: nobody waits for writes until one succeeds
        self._indexed: set[str] = set()  # records whose index entry this process has written

    def key(self, session_id: str) -> str:
        return self.keys.session(session_id)

    def index_key(self, digest: str) -> str:
        return self.keys.request(digest)

    def lease_key(self, digest: str) -> str:
        return self.keys.lease(digest)

    def update(self, session_id: str, record: SessionRecord | dict[str, Any], index: str | None = None) -> None:
        """Schedule a write of the record (coalesced with any write in flight), and of the
        index entry `index` -> session_id when given."""
        self._latest[session_id] = (record, index)  # serialized when written: only the latest is
        if session_id not in self._writing:
            self._writing[session_id] = asyncio.Event()
            asyncio.get_running_loop().create_task(self._flush(session_id))

    async def _flush(self, session_id: str) -> None:
        try:
            while session_id in self._latest:
                record, index = self._latest.pop(session_id)
                raw = record.to_json() if isinstance(record, SessionRecord) else json.dumps(record)
                done = isinstance(record, SessionRecord) and record.state == "done"
                if index is not None and (session_id not in self._indexed or done):
                    # The index with the first write and the last (its TTL then runs from the
                    # end, like the record's); in between a plain SET costs a third of a pipeline.
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.set(self.key(session_id), raw, ex=SESSION_TTL_S)
                        pipe.set(self.index_key(index), session_id, ex=SESSION_TTL_S)
                        await pipe.execute()
                    self._indexed.add(session_id)
                else:
                    await self.redis.set(self.key(session_id), raw, ex=SESSION_TTL_S)
            self.failing = False
        except Exception as exc:
            if not self.failing:
                log.warning("session record write failed: %s", exc)
            self.failing = True
            self._indexed.clear()  # a restarted Redis lost the index entries too: write them again
            self._latest.pop(session_id, None)
        finally:
            self._writing.pop(session_id).set()

    def forget(self, session_id: str) -> None:
        """The request has left this process: its next writer writes the index again."""
        self._indexed.discard(session_id)

    async def settled(self, session_id: str, timeout_s: float | None = None) -> None:
        """Return once the record's scheduled writes are done (or failed), or after
        `timeout_s`; at once while writes are failing."""
        writing = self._writing.get(session_id)
        if writing is None or (timeout_s is not None and self.failing):
            return
        try:
            await asyncio.wait_for(writing.wait(), timeout_s)
        except TimeoutError:
            self.failing = True  # Redis is slow: stop waiting for it until a write lands

    async def get(self, session_id: str) -> dict[str, Any] | None:
        """The raw record as JSON (for inspection); None when missing or not JSON."""
        raw = await self.redis.get(self.key(session_id))
        try:
            data = None if raw is None else json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def find(
        self, digest: str, request_id: str, fingerprint: str, vocab_size: int, max_context: int
    ) -> tuple[str, SessionRecord] | None:
        """(record id, record) of the request named by `digest`, or None: missing, expired,
        not well formed, or another request's (each of those a miss, the bad ones logged)."""
        record_id = await self.redis.get(self.index_key(digest))
        if record_id is None:
            return None
        record_id = record_id.decode(errors="replace") if isinstance(record_id, bytes) else str(record_id)
        if not 0 < len(record_id) <= MAX_ID_CHARS or not record_id.isprintable():
            log.warning("session index %s: not a record id; ignored", digest)
            return None
        raw = await self.redis.get(self.key(record_id))
        if raw is None:
            return None
        try:
            record = SessionRecord.from_json(raw, vocab_size, max_context)
        except RecordError as exc:
            log.warning("session record %s is not well formed (%s); treated as missing", record_id[:64], str(exc)[:200])
            return None
        if record.request_id != request_id or record.fingerprint != fingerprint:
            log.warning("session record %s belongs to another request; treated as missing", record_id[:64])
            return None
        return record_id, record

    async def close(self) -> None:
        await self.redis.aclose()


class Leases:
    """Which coordinator runs a request: a Redis key per request, held by one owner, kept
    alive by one task for all of this process's leases. A lease found taken by another
    owner on refresh is lost: `on_lost(digest)` tells its run to stop."""

    def __init__(
        self,
        store: SessionStore,
        owner: str,
        on_lost: Callable[[str], None],
        ttl_s: float = LEASE_TTL_S,
        refresh_s: float = LEASE_REFRESH_S,
    ) -> None:
        self.store, self.owner, self.on_lost, self.ttl_ms = store, owner, on_lost, int(ttl_s * 1000)
        self.refresh_s = refresh_s
        self.held: set[str] = set()
        self._refresher: asyncio.Task[None] | None = None

    async def take(self, digest: str, dead_holder: str = "") -> str | None:
        """Take the lease when it is free, or held by `dead_holder`: None when taken, else
        who holds it ("" when it was released meanwhile: try again)."""
        key = self.store.lease_key(digest)
        if await self.store.redis.eval(_TAKE, 1, key, dead_holder, self.owner, self.ttl_ms):
            self.held.add(digest)
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.get_running_loop().create_task(self._refresh())
            return None
        holder = await self.store.redis.get(key)
        return "" if holder is None else holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)

    async def release(self, digest: str) -> None:
        self.held.discard(digest)
        with contextlib.suppress(Exception):  # Redis down: the lease expires by itself
            await self.store.redis.eval(_DROP, 1, self.store.lease_key(digest), self.owner)

    async def _refresh(self) -> None:
        while self.held:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.keep()
            except Exception as exc:  # Redis down: keep running; the leases may lapse
                log.debug("lease refresh failed: %s", exc)

    def close(self) -> None:
        """Stop renewing (the leases lapse by themselves)."""
        self.held.clear()
        if self._refresher is not None:
            self._refresher.cancel()

    async def keep(self) -> None:
        """Renew every lease held (one pipeline); one another owner took is lost."""
        digests = list(self.held)
        if not digests:
            return
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for digest in digests:
                pipe.eval(_KEEP, 1, self.store.lease_key(digest), self.owner, self.ttl_ms)
            kept = await pipe.execute()
        for digest, ok in zip(digests, kept):
            if not ok and digest in self.held:
                log.warning("lease of request %s lost to another coordinator", digest)
                self.held.discard(digest)
                self.on_lost(digest)
