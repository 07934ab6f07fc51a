"""`migrate` to a file as QEMU scripts drive it: one job at a time in its own thread, its status for
`query-migrate`, and MIGRATION events (QAPI MigrationStatus: setup, active, completed, failed).

    stop; migrate {"uri": "file:/path/vm.snap"}; query-migrate until "completed"; then cont or quit

A failed save (disk full, an I/O error) reports "failed" with the reason in `error-desc`; the guest carries on
as it was (paused, since `stop` or the save paused it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memvisor.control.machine_api import EventSink, MachineError
from memvisor.errors import MemvisorError

if TYPE_CHECKING:  # memvisor.vmm.snapshot imports every device model: not at start-up
    from memvisor.vmm.snapshot import Progress, SaveResult

FILE_PREFIX = "file:"


def parse_file_uri(uri: str) -> Path:
    """The path of a `file:PATH` URI (QEMU 8.2's syntax); MachineError for anything else."""
    if not uri.startswith(FILE_PREFIX) or len(uri) == len(FILE_PREFIX):
        raise MachineError(f"migration URI {uri!r} is not supported: memvisor saves to files, give file:PATH")
    path = Path(uri[len(FILE_PREFIX) :].split(",", 1)[0])  # QEMU allows file:PATH,offset=N; no offset here
    if not path.parent.is_dir():
        raise MachineError(f"cannot save to {path}: directory {path.parent} does not exist")
    return path


class MigrationJob:
    """The latest `migrate` and its progress."""

    def __init__(self, emit: Callable[[], EventSink | None]) -> None:
        self._lock = threading.Lock()
        self._emit = emit
        self.status = "none"
        self._started = 0.0
        self._ended = 0.0
        self._done = 0
        self._total = 0
        self._error = ""
        self._result: SaveResult | None = None
        self._thread: threading.Thread | None = None

    def start(self, save: Callable[[Progress], SaveResult]) -> None:
        with self._lock:
            if self.status in ("setup", "active"):
                raise MachineError("There's a migration process in progress")
            self._started, self._ended, self._done, self._total, self._error = time.monotonic(), 0.0, 0, 0, ""
            self._result = None
            self._set("setup")
        self._thread = threading.Thread(target=self._run, args=(save,), name="migrate", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _set(self, status: str) -> None:
        self.status = status
        sink = self._emit()
        if sink is not None:
            sink("MIGRATION", {"status": status})

    def _progress(self, done: int, total: int) -> None:
        self._done, self._total = done, total

    def _run(self, save: Callable[[Progress], SaveResult]) -> None:
        with self._lock:
            self._set("active")
        try:
            result = save(self._progress)
        except (MemvisorError, MachineError, OSError) as error:
            with self._lock:
                self._error = str(error)
                self._ended = time.monotonic()
                self._set("failed")
            return
        with self._lock:
            self._result = result
            self._done, self._total = result.bytes_written, result.total_bytes
            self._ended = time.monotonic()
            self._set("completed")

    def info(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo."""
        with self._lock:
            if self.status == "none":
                return {}
            reply: dict[str, Any] = {"status": self.status}
            end = self._ended or time.monotonic()
            elapsed_ms = int((end - self._started) * 1000)
            if self.status in ("completed", "failed"):
                reply["total-time"] = elapsed_ms
            else:
                reply["expected-downtime"] = elapsed_ms
            reply["ram"] = {
                "transferred": self._done,
                "total": self._total,
                "remaining": max(0, self._total - self._done) if self.status == "active" else 0,
                "normal-bytes": self._done,
                "normal": self._done // 4096,
                "duplicate": 0,
                "skipped": 0,
                "mbps": 0,
                "dirty-sync-count": 1,
            }
            if self._result is not None:
                reply["ram"]["skipped"] = self._result.free_skipped // 4096  # hinted free, not written since
                reply["x-file-size"] = self._result.file_size
                reply["x-file-allocated"] = self._result.allocated
            if self._error:
                reply["error-desc"] = self._error
            return reply


class IncomingSlot:
    """`memvisor run --incoming defer`: the machine waits, built and never started, until QMP `migrate-incoming`
    names the snapshot; the load runs in the QMP call (its reply says whether it worked), then the session
    starts the vCPUs. A refused snapshot ends memvisor (exit 125), as QEMU ends after a failed incoming migration.
    """

    def __init__(self, load: Callable[[Path], object],
                 listen: Callable[[str], Callable[[], object]] | None = None) -> None:  # fmt: skip
        self._load = load
        # tcp:/unix: live migration (memvisor/migration/incoming.py, deferred_listen): listen(uri) opens the port
        # (raising MemvisorError if it cannot) and returns the receive, which runs in a thread
        self._listen = listen
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._started = False
        self.error: str | None = None

    def migrate_incoming(self, uri: str) -> None:
        from memvisor.migration.transport import is_stream_uri

        if self._listen is not None and is_stream_uri(uri):
            self._migrate_live(uri, self._listen)
            return
        if not uri.startswith(FILE_PREFIX) or len(uri) == len(FILE_PREFIX):
            raise MachineError(f"migration URI {uri!r} is not supported: memvisor restores from files, give file:PATH")
        with self._lock:
            if self._started:
                raise MachineError("The incoming migration has already been started")
            self._started = True
        try:
            self._load(Path(uri[len(FILE_PREFIX) :]))
        except MemvisorError as error:
            self.error = str(error)
            raise MachineError(self.error) from None
        finally:
            self._event.set()

    def _migrate_live(self, uri: str, listen: Callable[[str], Callable[[], object]]) -> None:
        """Listen now (the reply says whether that worked: a port that cannot be opened may be retried with
        another URI, as QEMU allows), receive in a thread (QEMU answers at once too)."""
        with self._lock:
            if self._started:
                raise MachineError("The incoming migration has already been started")
            try:
                receive = listen(uri)
            except MemvisorError as error:
                raise MachineError(str(error)) from None
            self._started = True

        def run() -> None:
            try:
                receive()
            except Exception as error:  # any failure ends memvisor (125), never a half-loaded guest that runs
                self.error = str(error) or type(error).__name__
            finally:
                self._event.set()

        threading.Thread(target=run, name="migrate-incoming", daemon=True).start()

    def wait(self, give_up: Callable[[], bool], poll: float = 0.2) -> bool:
        """Block until a migrate-incoming finished (True) or `give_up()` says the machine is ending (False)."""
        while not self._event.wait(poll):
            if give_up():
                return False
        return True
