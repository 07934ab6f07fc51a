"""QMP's view of a live migration: `migrate` (tcp:/unix:) runs PreCopy in a thread; `query-migrate`,
`migrate_cancel`, the parameters, and the MIGRATION / MIGRATION_PASS events (QAPI MigrationStatus: setup,
active, completed, failed, cancelled).

On failure or cancel the source goes on as before: the vCPUs run again if `migrate` found them running. On
success the machine stays paused; the caller reports run state "postmigrate" (as QEMU).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from memvisor.control.machine_api import EventSink, MachineError
from memvisor.errors import MemvisorError
from memvisor.migration.source import (
    MigrationCancelled,
    MigrationParameters,
    MigrationStats,
    PreCopy,
    SourceHooks,
)
from memvisor.migration.stream import PAGE_SIZE
from memvisor.migration.transport import connect, parse_uri

PARAMETER_NAMES = {"downtime-limit": "downtime_limit_ms", "max-bandwidth": "max_bandwidth",
                   "x-max-passes": "max_passes"}  # fmt: skip
CAPABILITIES = ("xbzrle", "auto-converge", "zero-blocks", "events", "postcopy-ram", "return-path")


class LiveMigrationJob:
    """The latest live migration of one machine."""

    def __init__(self, emit: Callable[[], EventSink | None], params: MigrationParameters | None = None) -> None:
        self._lock = threading.Lock()
        self._emit = emit
        self.params = params or MigrationParameters()
        self.capabilities: dict[str, bool] = dict.fromkeys(CAPABILITIES, False) | {"events": True}
        self.status = "none"
        self.stats = MigrationStats()
        self.error = ""
        self._started = 0.0
        self._ended = 0.0
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: Any = None

    @property
    def running(self) -> bool:
        return self.status in ("setup", "active", "cancelling")

    def _set(self, status: str) -> None:
        self.status = status
        sink = self._emit()
        if sink is not None:
            sink("MIGRATION", {"status": status})

    def _pass(self, number: int) -> None:
        sink = self._emit()
        if sink is not None:
            sink("MIGRATION_PASS", {"pass": number})

    def start(self, machine: Any, uri: str, hooks: SourceHooks, was_running: bool,
              resume: Callable[[], None]) -> None:  # fmt: skip
        """Begin migrating `machine` to `uri`; `resume()` runs the vCPUs again after a failure (when
        `was_running`)."""
        endpoint = parse_uri(uri)
        with self._lock:
            if self.running:
                raise MachineError("There's a migration process in progress")
            self.stats, self.error, self._ended = MigrationStats(), "", 0.0
            self._started = time.monotonic()
            self._cancel = threading.Event()
            self._set("setup")
        self._thread = threading.Thread(target=self._run, args=(machine, endpoint, hooks, was_running, resume),
                                        name="migrate", daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, machine: Any, endpoint: Any, hooks: SourceHooks, was_running: bool,
             resume: Callable[[], None]) -> None:  # fmt: skip
        sock = None
        try:
            try:
                sock = connect(endpoint)
            except OSError as error:
                raise MemvisorError(f"cannot connect to {endpoint}: {error.strerror or error}") from None
            self._sock = sock
            precopy = PreCopy(machine, sock, hooks, self.params, self.stats, self._cancel)
            precopy.on_active = lambda: self._set("active")
            precopy.on_pass = self._pass
            precopy.run()
        except Exception as error:  # noqa: BLE001 - any failure: report it, and the source runs on
            cancelled = self._cancel.is_set() or isinstance(error, MigrationCancelled)
            with contextlib.suppress(Exception):
                if sock is not None:
                    sock.close()
            if was_running:
                with contextlib.suppress(Exception):
                    resume()
            with self._lock:
                self._ended = time.monotonic()
                if cancelled:
                    self.error = "cancelled by migrate_cancel"
                    self._set("cancelled")
                else:
                    text = getattr(error, "strerror", None) if isinstance(error, OSError) else None
                    known = isinstance(error, (MemvisorError, MachineError, OSError))
                    self.error = (f"the connection to the destination broke: {text}" if text else str(error)
                                  if known else f"{type(error).__name__}: {error}")  # fmt: skip
                    self._set("failed")
            return
        with contextlib.suppress(OSError):
            sock.close()
        with self._lock:
            self._ended = time.monotonic()
            self._set("completed")

    def cancel(self) -> None:
        """migrate_cancel: stop at the next record; a socket blocked in send is shut down."""
        if not self.running:
            return
        self._cancel.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def set_parameters(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            attribute = PARAMETER_NAMES.get(name)
            if attribute is None:
                raise MachineError(f"Parameter '{name}' is not supported: memvisor has {', '.join(PARAMETER_NAMES)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MachineError(f"Parameter '{name}' expects a non-negative integer")
            if name == "x-max-passes" and value < 1:
                raise MachineError("Parameter 'x-max-passes' expects at least 1")
            setattr(self.params, attribute, value)

    def parameters(self) -> dict[str, Any]:
        return {name: getattr(self.params, attribute) for name, attribute in PARAMETER_NAMES.items()}

    def set_capabilities(self, capabilities: list[dict[str, Any]]) -> None:
        for position, item in enumerate(capabilities):
            name, state = item.get("capability"), item.get("state")
            if name not in self.capabilities or not isinstance(state, bool):
                raise MachineError(f"capabilities[{position}]: unknown capability {name!r} or state not a bool")
            if state and name not in ("events", "zero-blocks"):
                raise MachineError(f"Capability '{name}' is not supported by memvisor")
            self.capabilities[name] = state

    def capability_list(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    def info(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo (QEMU's shape) plus memvisor's skipped counts."""
        with self._lock:
            if self.status == "none":
                return {}
            stats = self.stats
            end = self._ended or time.monotonic()
            reply: dict[str, Any] = {"status": self.status, "setup-time": stats.setup_ms}
            elapsed = int((end - self._started) * 1000)
            if self.running:
                reply["expected-downtime"] = stats.expected_downtime_ms
                if stats.throttle_percent:
                    reply["cpu-throttle-percentage"] = stats.throttle_percent
            else:
                reply["total-time"] = elapsed
            if self.status == "completed":
                reply["downtime"] = stats.downtime_ms
                reply["x-downtime-parts"] = dict(stats.downtime_parts)  # ms by step of the stop phase
            reply["ram"] = {
                "transferred": stats.transferred,
                "remaining": stats.remaining if self.running else 0,
                "total": stats.total,
                "duplicate": stats.duplicate,
                "normal": stats.normal,
                "normal-bytes": stats.normal * PAGE_SIZE,
                "dirty-pages-rate": stats.dirty_pages_rate,
                "mbps": round(stats.mbps, 3),
                "dirty-sync-count": stats.passes,
                "page-size": PAGE_SIZE,
                "skipped": sum(stats.skipped.values()),
                "x-skipped-pages": dict(stats.skipped),
                "x-dirty-log": stats.dirty_log,
            }
            if self.error:
                reply["error-desc"] = self.error
            return reply


def balloon_hooks(adapter: Any) -> SourceHooks:
    """The source's hooks over a control.adapters.BalloonAdapter (None: no balloon, nothing to skip)."""
    if adapter is None:
        return SourceHooks()
    device = adapter.device
    round_started = threading.Event()

    def hint_start() -> None:
        adapter.hint_start()  # UsageError/MemvisorError when the driver did not negotiate free page hinting
        round_started.set()

    def hinted() -> Any:
        import numpy as np

        if not round_started.is_set():
            return np.zeros(0, dtype=bool)  # no round of this migration: older hints are not trusted
        adapter.hinted_ranges()  # applies the writes logged since the last look first
        return device.hinted_pages()

    def inflated() -> Any:
        with device.lock:
            return device.inflated_bitmap.to_array()

    return SourceHooks(hint_start=hint_start, hint_stop=adapter.hint_stop, hinted=hinted, inflated=inflated)
