"""Guest memory statistics from the balloon's stats queue (virtio 1.2 section 5.5.6.3).

The protocol: the driver puts one buffer of (le16 tag, le64 value) entries on the stats queue; the device
keeps it. When the device wants fresh numbers it returns the buffer (used ring + interrupt); the driver
refills it and puts it back, and the device reads the new values. `BalloonStats` only decodes and keeps the
values; holding and returning the buffer is the device's job.

`as_guest_stats()` gives QEMU's `qom-get ... guest-stats` shape::

    {"stats": {"stat-swap-in": 0, "stat-free-memory": 812646400, ..., "stat-oom-kills": -1},
     "last-update": 1717000000}

A statistic the guest did not send in its last buffer is -1; `last-update` is the host's time.time() in
whole seconds when the last buffer arrived (0 before the first), so a guest cannot fake it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from memvisor.devices.balloon.constants import MAX_STATS_BYTES, STAT, STAT_COUNT, STAT_NAMES, STAT_UNSET


@dataclass
class ParseResult:
    """What one stats buffer held."""

    known: int = 0  # entries with a tag 0-15
    unknown: int = 0  # entries with any other tag (ignored, as the specification says)
    trailing: int = 0  # bytes after the last whole entry (ignored)


class BalloonStats:
    """The latest value of each statistic tag 0-15 and when it arrived."""

    def __init__(self) -> None:
        self.values: list[int | None] = [None] * STAT_COUNT
        self.last_update = 0.0  # time.time() of the last buffer, 0.0 if none yet
        self.updates = 0

    def parse(self, data: bytes, now: float | None = None) -> ParseResult:
        """Take the statistics in `data` (a whole stats buffer) as the guest's current ones.

        Values not in this buffer become unset, as in QEMU: a guest that stops sending a statistic (a
        rebooted older kernel) leaves no stale number behind. A tag sent twice keeps its last value.
        """
        data = data[:MAX_STATS_BYTES]
        whole = len(data) - len(data) % STAT.size
        result = ParseResult(trailing=len(data) - whole)
        values: list[int | None] = [None] * STAT_COUNT
        for tag, value in STAT.iter_unpack(data[:whole]):
            if tag < STAT_COUNT:
                values[tag] = value
                result.known += 1
            else:
                result.unknown += 1
        self.values = values
        self.last_update = time.time() if now is None else now
        self.updates += 1
        return result

    def get(self, name: str) -> int | None:
        """The value of the statistic named like QEMU names it ("stat-free-memory"), None if unset."""
        return self.values[STAT_NAMES.index(name)]

    def as_guest_stats(self) -> dict[str, Any]:
        """QEMU's guest-stats property: every statistic (-1 when unset) and the update time in seconds."""
        stats = {name: STAT_UNSET if value is None else value
                 for name, value in zip(STAT_NAMES, self.values, strict=True)}
        return {"stats": stats, "last-update": int(self.last_update)}

    def reset(self) -> None:
        self.values = [None] * STAT_COUNT
        self.last_update = 0.0
