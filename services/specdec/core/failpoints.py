"""Failpoints: faults a test can switch on in a real process, by environment.

    SPECDEC_FAILPOINTS="verify_batch=freeze@30"

freezes the 30th call of `failpoint("verify_batch")` for good (the thread blocks), as a
stuck kernel or a deadlock would; `verify_batch=sleep@20` makes every call take 20 ms longer,
as a slower accelerator would (fault tests use it to keep streams in flight while they strike).
Only tests set it; unset, a failpoint is one dict lookup.
"""

from __future__ import annotations

import os
import threading
import time

_counts: dict[str, int] = {}


def _parse(raw: str) -> dict[str, tuple[str, int]]:
    points = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, _, action = part.partition("=")
        kind, _, at = action.partition("@")
        if kind not in ("freeze", "sleep") or not at.isdigit():
            raise ValueError(f"SPECDEC_FAILPOINTS: {part!r} is not NAME=freeze@N or NAME=sleep@MS")
        points[name] = (kind, int(at))
    return points


_POINTS = _parse(os.environ.get("SPECDEC_FAILPOINTS", ""))


def failpoint(name: str) -> None:
    """Act if the failpoint `name` is configured and its call count is reached."""
    point = _POINTS.get(name)
    if point is None:
        return
    if point[0] == "sleep":
        time.sleep(point[1] / 1000)
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= point[1]:
        threading.Event().wait()  # frozen: nothing ever sets it
