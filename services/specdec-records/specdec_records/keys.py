"""Every Redis key specdec's processes share, built in one place.

One namespace per deployment (``prefix``, SPECDEC_REDIS_PREFIX; the operator uses
``specdec:{namespace}.{name}:``):

* ``{prefix}replica:{tier}:{replica_id}`` -> :class:`~specdec_records.ReplicaRecord` (JSON,
  SET EX a few heartbeats): the registry the coordinator routes on and the operator scales on;
* ``{prefix}session:{record_id}`` -> :class:`~specdec_records.SessionRecord` (JSON, TTL);
* ``{prefix}request:{digest}`` -> record id: finds a request's record by its request_id;
* ``{prefix}lease:{digest}`` -> owner: the one coordinator running the request now;
* ``{prefix}kv:{tier}:{chain}`` -> one KV-cache chunk (binary, TTL; see specdec.state.kv_store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TIERS = ("coordinator", "draft", "target")
DEFAULT_PREFIX = "specdec:"
_GLOB = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """`text` matched literally by SCAN MATCH (a prefix holding `*` must not match others')."""
    return _GLOB.sub(r"\\\1", text)


@dataclass(frozen=True)
class Keys:
    """Key names and SCAN patterns of one deployment's namespace."""

    prefix: str = DEFAULT_PREFIX

    def replica(self, tier: str, replica_id: str) -> str:
        return f"{self.prefix}replica:{tier}:{replica_id}"

    def replicas(self, tier: str | None = None) -> str:
        """SCAN pattern: every replica record, or one tier's."""
        return f"{glob_escape(self.prefix)}replica:{glob_escape(tier) if tier else '*'}:*"

    def session(self, record_id: str) -> str:
        return f"{self.prefix}session:{record_id}"

    def sessions(self) -> str:
        """SCAN pattern: every session record."""
        return f"{glob_escape(self.prefix)}session:*"

    def request(self, digest: str) -> str:
        return f"{self.prefix}request:{digest}"

    def lease(self, digest: str) -> str:
        return f"{self.prefix}lease:{digest}"

    def kv_chunk(self, tier: str, chain: str) -> str:
        return f"{self.prefix}kv:{tier}:{chain}"

    def kv_chunks(self, tier: str) -> str:
        """SCAN pattern: one tier's KV chunks."""
        return f"{glob_escape(self.prefix)}kv:{glob_escape(tier)}:*"

    def everything(self) -> str:
        """SCAN pattern: every key of this namespace."""
        return f"{glob_escape(self.prefix)}*"
