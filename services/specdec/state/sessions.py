"""Session records in Redis: what the coordinator needs to resume or inspect a request.

Written off the hot path: at most one write in flight per session, the latest state wins,
and a Redis outage only costs the record, never the request.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger(__name__)
SESSION_TTL_S = 3600


class SessionStore:
    def __init__(self, redis_url: str, prefix: str = "specdec:") -> None:
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._latest: dict[str, dict[str, Any]] = {}
        self._writing: set[str] = set()

    def key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def update(self, session_id: str, record: dict[str, Any]) -> None:
        """Schedule a write of the record (coalesced with any write in flight)."""
        self._latest[session_id] = record
        if session_id not in self._writing:
            self._writing.add(session_id)
            asyncio.get_running_loop().create_task(self._flush(session_id))

    async def _flush(self, session_id: str) -> None:
        try:
            while session_id in self._latest:
                record = self._latest.pop(session_id)
                await self.redis.set(self.key(session_id), json.dumps(record), ex=SESSION_TTL_S)
        except Exception as exc:
            log.debug("session record write failed: %s", exc)
            self._latest.pop(session_id, None)
        finally:
            self._writing.discard(session_id)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.key(session_id))
        return None if raw is None else json.loads(raw)

    async def close(self) -> None:
        await self.redis.aclose()
