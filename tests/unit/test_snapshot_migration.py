"""QMP `migrate` to a file and `query-migrate`: the job's states, events, failures, and the CLI's bar."""

import threading
from pathlib import Path
from typing import Any

import pytest

from memvisor.control.client import QmpCommandError
from memvisor.control.commands import Context, execute
from memvisor.control.errors import QmpError
from memvisor.control.machine_api import MachineError
from memvisor.control.snapshot_verb import hint_round, progress_line
from memvisor.errors import MemvisorError
from memvisor.vmm.migration import MigrationJob, parse_file_uri
from memvisor.vmm.snapshot import SaveResult


def _result(path: Path) -> SaveResult:
    return SaveResult(path, 300 << 20, 1 << 30, (1 << 30) + (4 << 20), 301 << 20, 0.5, free_skipped=200 << 20)


def test_a_completed_job_reports_bytes_and_emits_events(tmp_path: Path) -> None:
    events: list[tuple[str, Any]] = []
    job = MigrationJob(lambda: lambda name, data: events.append((name, data)))
    assert job.info() == {}

    def save(progress: Any) -> SaveResult:
        progress(100 << 20, 1 << 30)
        return _result(tmp_path / "s")

    job.start(save)
    job.wait(5)
    info = job.info()
    assert info["status"] == "completed"
    assert info["ram"]["transferred"] == 300 << 20 and info["ram"]["total"] == 1 << 30
    assert info["ram"]["remaining"] == 0
    assert info["ram"]["skipped"] == (200 << 20) // 4096  # pages hinted free and left out
    assert info["x-file-allocated"] == 301 << 20
    assert "total-time" in info
    assert [data["status"] for name, data in events if name == "MIGRATION"] == ["setup", "active", "completed"]


def test_a_failed_save_reports_failed_with_the_reason() -> None:
    job = MigrationJob(lambda: None)

    def save(progress: Any) -> SaveResult:
        raise MemvisorError("writing snapshot /x failed: No space left on device; the guest was not changed")

    job.start(save)
    job.wait(5)
    info = job.info()
    assert info["status"] == "failed"
    assert "No space left on device" in info["error-desc"]


def test_a_second_migrate_while_one_runs_is_refused(tmp_path: Path) -> None:
    job = MigrationJob(lambda: None)
    release = threading.Event()

    def save(progress: Any) -> SaveResult:
        release.wait(5)
        return _result(tmp_path / "s")

    job.start(save)
    with pytest.raises(MachineError, match="migration process in progress"):
        job.start(save)
    release.set()
    job.wait(5)
    job.start(lambda progress: _result(tmp_path / "t"))  # once it is over, another may start
    job.wait(5)
    assert job.info()["status"] == "completed"


def test_file_uris(tmp_path: Path) -> None:
    assert parse_file_uri(f"file:{tmp_path}/vm.snap") == tmp_path / "vm.snap"
    for bad in ("exec:cat > x", "tcp:localhost:4444", "file:"):
        with pytest.raises(MachineError, match="give file:PATH"):
            parse_file_uri(bad)
    with pytest.raises(MachineError, match="does not exist"):
        parse_file_uri(f"file:{tmp_path}/nowhere/vm.snap")


class _Machine:
    def __init__(self) -> None:
        self.uris: list[str] = []

    def migrate(self, uri: str) -> None:
        self.uris.append(uri)

    def migration_info(self) -> dict[str, Any]:
        return {"status": "active"}


def test_qmp_commands_reach_the_machine() -> None:
    machine = _Machine()
    ctx = Context(machine, lambda name, data: None)  # type: ignore[arg-type]
    assert execute(ctx, "migrate", {"uri": "file:/tmp/x"}) == {}
    assert machine.uris == ["file:/tmp/x"]
    assert execute(ctx, "query-migrate", {}) == {"status": "active"}
    with pytest.raises(QmpError, match="block migration"):
        execute(ctx, "migrate", {"uri": "file:/tmp/x", "blk": True})
    with pytest.raises(QmpError):
        execute(ctx, "migrate", {})


def test_progress_line() -> None:
    assert progress_line(0, 0).startswith("[" + "." * 30 + "]")
    assert progress_line(512 << 20, 1 << 30) == "[" + "#" * 15 + "." * 15 + "]  50%  512M/1024M"


class _HintQmp:
    """The QMP of a VM whose balloon hints `rounds` polls long (None: no balloon with free page hinting)."""

    def __init__(self, rounds: int | None) -> None:
        self.rounds, self.state = rounds, "running"
        self.calls: list[str] = []

    def execute(self, command: str, arguments: Any = None) -> Any:
        self.calls.append(command)
        if self.rounds is None:
            raise QmpCommandError(command, "GenericError", "the balloon's driver did not negotiate free page hinting")
        if command == "x-query-balloon-hints":
            self.rounds -= 1
            return [{"cmd-id": 2, "state": self.state if self.rounds > 0 else "stopped", "pages": 10, "bytes": 40960}]
        return {"cmd-id": 2, "state": "done", "pages": 10, "bytes": 40960}


def test_the_snapshot_verb_asks_for_hints_until_the_guest_has_sent_them_all() -> None:
    qmp = _HintQmp(3)
    assert hint_round(qmp, timeout=5, poll=0) == 40960
    assert qmp.calls == ["x-balloon-hint-start", *["x-query-balloon-hints"] * 3, "x-balloon-hint-stop"]
    slow = _HintQmp(10**9)  # a guest that never finishes: the round ends at the timeout all the same
    assert hint_round(slow, timeout=0.05, poll=0.01, answer=0) == 40960 and slow.calls[-1] == "x-balloon-hint-stop"
    deaf = _HintQmp(10**9)
    deaf.state = "requested"  # a driver that never echoes the command id: given up after `answer` seconds
    assert hint_round(deaf, timeout=60, poll=0.01, answer=0.05) == 40960 and deaf.calls[-1] == "x-balloon-hint-stop"
    none = _HintQmp(None)  # no hinting balloon: nothing asked, the save goes on
    assert hint_round(none) == 0 and none.calls == ["x-balloon-hint-start"]


def test_incoming_slot_loads_once_and_wakes_the_waiter(tmp_path: Path) -> None:
    from memvisor.vmm.migration import IncomingSlot

    loaded: list[Path] = []
    slot = IncomingSlot(loaded.append)
    assert not slot.wait(lambda: True, poll=0.01)  # the machine ended while waiting
    waiter = threading.Thread(target=lambda: slot.wait(lambda: False, poll=0.01))
    waiter.start()
    with pytest.raises(MachineError, match="give file:PATH"):
        slot.migrate_incoming("tcp:0:4444")
    slot.migrate_incoming(f"file:{tmp_path}/vm.snap")
    waiter.join(5)
    assert not waiter.is_alive()
    assert loaded == [tmp_path / "vm.snap"] and slot.error is None
    with pytest.raises(MachineError, match="already been started"):
        slot.migrate_incoming(f"file:{tmp_path}/vm.snap")


def test_incoming_slot_reports_a_refused_snapshot() -> None:
    from memvisor.snapshot.codec import StateError
    from memvisor.vmm.migration import IncomingSlot

    def load(path: Path) -> None:
        raise StateError("machine.vcpus: the snapshot has 2 vCPUs, this command line 1: give --vcpus 2")

    slot = IncomingSlot(load)
    with pytest.raises(MachineError, match="give --vcpus 2"):
        slot.migrate_incoming("file:/x")
    assert slot.wait(lambda: False, poll=0.01)
    assert slot.error is not None and "--vcpus 2" in slot.error


def test_migrate_incoming_without_defer_is_refused() -> None:
    from memvisor.vmm.control import VmmControl

    with pytest.raises(MachineError, match="--incoming defer"):
        VmmControl().migrate_incoming("file:/x")
