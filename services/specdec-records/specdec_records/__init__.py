"""The Redis contract between specdec's processes, in one torch-free place.

Every key name (:class:`Keys`), every record two processes exchange (:class:`ReplicaRecord`
with its :class:`Load`, :class:`SessionRecord`) and the one way to connect
(:func:`connect`, :func:`connect_async`) live here. The services, the launcher, the operator
and the tests import them; nothing else spells a key or a field, so a rename is one edit
that both the producer and the consumer see.
"""

from specdec_records.connect import RedisTls, Timeouts, connect, connect_async, connection_options, redact
from specdec_records.errors import RecordError
from specdec_records.keys import TIERS, Keys
from specdec_records.replica import Load, ReplicaRecord
from specdec_records.session import SESSION_TTL_S, SessionRecord, request_digest

__all__ = [
    "SESSION_TTL_S",
    "TIERS",
    "Keys",
    "Load",
    "RecordError",
    "RedisTls",
    "ReplicaRecord",
    "SessionRecord",
    "Timeouts",
    "connect",
    "connect_async",
    "connection_options",
    "redact",
    "request_digest",
]
