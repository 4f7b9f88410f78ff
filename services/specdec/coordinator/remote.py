"""Remote Drafter and Verifier: the loop's seams implemented as gRPC stream clients.

Failover: when a replica's stream breaks or times out, the replica is quarantined and
the call answers `needs_resync`; the loop resends the session's tokens from 0, the pool
routes it to another replica, and that replica recomputes the cache. The counter-based
randomness makes the replay produce the same tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from specdec.coordinator.routing import ReplicaPool
from specdec.core.errors import TierUnavailable
from specdec.core.types import Proposal, ProposeItem, Verdict, VerifyItem
from specdec.rpc import convert
from specdec.rpc.errors import raise_item_error
from specdec.rpc.streams import ReplicaFailed
from specdec.telemetry import traceparent

log = logging.getLogger(__name__)


class RemoteTier:
    """Send one item to the session's replica, failing over on a broken replica."""

    def __init__(self, pool: ReplicaPool, timeout_s: float, max_failovers: int) -> None:
        self.pool, self.timeout_s, self.max_failovers = pool, timeout_s, max_failovers

    async def call(
        self,
        session_id: str,
        prefix_len: int,
        build: Callable[[int], Any],
        serves: str | None = None,
        prompt: list[int] | None = None,
    ) -> tuple[Any, str] | None:
        """(the result message, the replica that answered), or None when the session must be
        resent from 0. A replica whose stream broke but that answers a reconnect keeps the
        session (its state is still there: the item is resent as it was)."""
        reconnected = False
        for _ in range(self.max_failovers + 1):
            client = await self.pool.client_for(session_id, serves, prompt if not prefix_len else None)
            try:
                result = await asyncio.wait_for(client.call(build), self.timeout_s)
            except (ReplicaFailed, TimeoutError) as exc:
                if isinstance(exc, ReplicaFailed) and not reconnected and await self.pool.reconnects(client.address):
                    reconnected = True
                    log.info("%s replica %s: stream broke (%s); reconnected", self.pool.tier, client.address, exc)
                    continue
                log.warning("%s replica %s failed (%s); failing over", self.pool.tier, client.address, exc)
                self.pool.mark_failed(client.address)
                if prefix_len:
                    return None  # the next replica lacks the prefix: resend everything
                continue
            self.pool.mark_ok(client.address)
            if result.HasField("error"):
                raise_item_error(result.error, f"{self.pool.tier} replica {client.address}")
            return result, client.address
        raise TierUnavailable(self.pool.tier, f"{self.max_failovers + 1} replicas failed in a row")

    async def release(self, session_id: str) -> None:
        self.pool.release(session_id)


class RemoteVerifier(RemoteTier):
    async def verify(self, item: VerifyItem) -> Verdict:
        parent = traceparent()  # the step's span: the target's span joins the request's trace
        result = await self.call(
            item.session_id,
            item.prefix_len,
            lambda tag: convert.verify_item_to_proto(tag, item, parent),
            prompt=item.tokens,  # a new session's prompt: its replica is where siblings are (prompt affinity)
        )
        return Verdict(needs_resync=True) if result is None else convert.verdict_from_proto(*result)


class RemoteDrafter(RemoteTier):
    """With no draft replica up, a step proposes nothing: plain decoding, never an error."""

    async def propose(self, item: ProposeItem) -> Proposal:
        try:
            parent = traceparent()
            result = await self.call(
                item.session_id,
                item.prefix_len,
                lambda tag: convert.propose_item_to_proto(tag, item, parent),
                item.drafter,
                item.tokens,
            )
        except TierUnavailable as exc:
            log.info("no draft replica (%s); decoding without speculation", exc)
            return Proposal(unavailable=True)
        return Proposal(needs_resync=True) if result is None else convert.proposal_from_proto(*result)
