"""The one error a record read back from Redis raises when it is not well formed."""

from __future__ import annotations


class RecordError(ValueError):
    """A record that is not what its key promises (not JSON, a field missing or of the wrong
    type or range). Readers log it and skip the record: whoever can write to Redis must not
    be able to fail a request or a reconcile with it."""

    def __init__(self, kind: str, field: str, message: str) -> None:
        super().__init__(f"{kind} record: {field}: {message}")
        self.kind, self.field = kind, field


def is_a(value: object, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not a number (JSON true is not 1 here)."""
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)
