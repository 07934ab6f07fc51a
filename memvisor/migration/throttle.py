"""Auto-converge-like throttling: when pre-copy does not converge, the guest's vCPUs are held part of the time.

QEMU's auto-converge sleeps each vCPU for a share of every 10 ms; memvisor parks all vCPUs (Machine.hold, not
Machine.pause: the guest still reads as running, as QEMU's does while throttled, and a user's stop or cont in
between is kept) for `percent` % of every `period` seconds. The share starts at `initial` % when pass `start_pass` ends
without the dirty set fitting the downtime limit, grows by `step` % after each further such pass, up to
`maximum` %. It is stopped (vCPUs released) before the final phase pauses the machine for good, and on any
failure.
"""

from __future__ import annotations

import threading
from typing import Protocol

INITIAL, STEP, MAXIMUM = 20, 10, 99  # QEMU's cpu-throttle-initial / -increment defaults, and its maximum
START_PASS = 4
PERIOD = 0.1


class Holdable(Protocol):
    def hold(self, timeout: float = 5.0) -> bool: ...

    def release(self) -> None: ...


class Throttle:
    def __init__(self, machine: Holdable, period: float = PERIOD, *, enabled: bool = True) -> None:
        self._machine = machine
        self._enabled = enabled  # a guest paused by `stop` before the migration is never released by a throttle
        self._period = period
        self.percent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_pass(self, number: int, converged: bool) -> None:
        """Called after each pre-copy pass: raise the throttle when the migration does not converge."""
        if converged or number < START_PASS or not self._enabled:
            return
        self.percent = INITIAL if self.percent == 0 else min(MAXIMUM, self.percent + STEP)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="migration-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            held = self._period * self.percent / 100
            if self._machine.hold(timeout=held + 1.0):
                self._stop.wait(held)
            self._machine.release()
            self._stop.wait(self._period - held)

    def stop(self) -> None:
        """End throttling; the vCPUs run freely again (before the final phase pauses them, or on failure)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
