"""Domain errors. Services map them to gRPC status codes at the edge."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A request field is invalid; `field` names it (dotted path as in the proto)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TierUnavailable(RuntimeError):
    """No replica of a tier could serve the work."""

    def __init__(self, tier: str, detail: str = "") -> None:
        super().__init__(f"{tier} tier unavailable" + (f": {detail}" if detail else ""))
        self.tier = tier


class Overloaded(RuntimeError):
    """Too much is queued already; the caller should retry after `retry_after_s`."""

    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(f"{what}; retry in about {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s
