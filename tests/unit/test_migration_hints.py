"""benchmarks/migration_hints.py without KVM: the rows --only picks, QEMU's source and destination command lines,
the watch over query-migrate, one row's steps with pretend guests, and the table with issue 9's goals."""

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import migration_hints as mh
from benchmarks.migration_hints import Case

MiB, GiB = 1 << 20, 1 << 30


# --- the rows -------------------------------------------------------------------------------------------------------


def test_all_rows_run_scenario_by_scenario_memvisor_then_qemu() -> None:
    assert [case.label for case in mh.plan(None)] == [
        "memvisor hints-off idle", "qemu hints-off idle", "memvisor hints-on idle", "qemu hints-on idle",
        "memvisor hints-off dirty", "qemu hints-off dirty", "memvisor hints-on dirty", "qemu hints-on dirty",
    ]  # fmt: skip


def test_only_keeps_the_rows_matching_every_kind_named() -> None:
    assert mh.plan("qemu,dirty") == [Case("qemu", False, "dirty"), Case("qemu", True, "dirty")]
    assert mh.plan(" hints-on , idle ") == [Case("memvisor", True, "idle"), Case("qemu", True, "idle")]
    assert mh.plan("memvisor,qemu,hints-off,dirty") == [
        Case("memvisor", False, "dirty"),
        Case("qemu", False, "dirty"),
    ]
    assert len(mh.plan("")) == 8
    with pytest.raises(
        ValueError, match="unknown kvm, on; give any of memvisor, qemu, idle, dirty, hints-off"
    ):
        mh.plan("kvm,idle,on")


def test_an_unknown_only_word_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["migration_hints.py", "--only", "xen"])
    with pytest.raises(SystemExit) as ended:
        mh.main()
    assert ended.value.code == 2 and "--only: unknown xen" in capsys.readouterr().err


# --- QEMU's command lines -------------------------------------------------------------------------------------------


def test_qemus_destination_is_its_source_with_incoming(tmp_path: Path) -> None:
    source = mh.qemu_machine(tmp_path, Path("/k"), Path("/i"), True, None).argv()
    dest = mh.qemu_machine(tmp_path, Path("/k"), Path("/i"), True, "unix:/run/mig.sock").argv()
    assert "-incoming" not in source and dest == [*source, "-incoming", "unix:/run/mig.sock"]
    assert "iothread,id=balloon0-hints" in source  # QEMU's hinting runs in an iothread
    assert "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=balloon0-hints" in source
    assert source[source.index("-m") + 1] == "1024M"
    plain = mh.qemu_machine(tmp_path, Path("/k"), Path("/i"), False, None).argv()
    assert "virtio-balloon-pci,id=balloon0" in plain and not any("iothread" in word for word in plain)


# --- the watch over query-migrate -----------------------------------------------------------------------------------


class FakeGuest:
    """A guest's QMP and exec as migrate_case uses them: query-migrate answers from `replies` (the last
    repeats), check() from `answers` (by command prefix)."""

    def __init__(
        self, replies: list[dict[str, Any]] | None = None, answers: dict[str, str] | None = None
    ) -> None:
        self.replies = replies or []
        self.answers = answers or {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.ran: list[str] = []
        self.closed = False

    def cmd(self, name: str, **arguments: Any) -> Any:
        self.commands.append((name, arguments))
        if name == "query-migrate":
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return {}

    def check(self, command: str, timeout: float = 120) -> str:
        self.ran.append(command)
        return next((out for prefix, out in self.answers.items() if command.startswith(prefix)), "")

    def close(self) -> None:
        self.closed = True


def active(rate: int, throttle: int) -> dict[str, Any]:
    return {"status": "active", "cpu-throttle-percentage": throttle,
            "ram": {"transferred": 300 * MiB, "remaining": 100 * MiB, "dirty-pages-rate": rate, "page-size": 4096,
                    "dirty-sync-count": 3}}  # fmt: skip


COMPLETED = {"status": "completed", "total-time": 41_500, "downtime": 120, "setup-time": 30,
             "ram": {"transferred": 600 * MiB, "total": GiB, "dirty-sync-count": 7, "page-size": 4096,
                     "normal": 150_000, "duplicate": 100_000}}  # fmt: skip


@pytest.fixture(autouse=True)
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mh, "POLL", 0.0)
    monkeypatch.setattr(mh, "SETTLE", 0.0)


def test_the_watch_keeps_the_highest_dirty_rate_and_throttle_seen_while_active(
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = FakeGuest([active(2560, 20), active(5120, 30), active(1280, 10), COMPLETED])
    info, watch = mh.watch_migration(source, "qemu hints-on dirty", timeout=60)
    assert info is COMPLETED and (watch.dirty_pages_rate_max, watch.throttle_max, watch.polls) == (
        5120,
        30,
        4,
    )
    row = mh.result_row(Case("qemu", True, "dirty"), info, watch)
    assert (
        row["dirty-pages-rate-max"] == 5120 and row["dirty-pages-rate-last"] is None
    )  # QEMU drops it when done
    assert (row["transferred"], row["ram"], row["ratio"], row["passes"]) == (600 * MiB, GiB, 0.5859, 7)
    assert "qemu hints-on dirty:     0 s completed, 600 MiB sent" in capsys.readouterr().err


def test_a_migration_past_its_timeout_is_cancelled() -> None:
    source = FakeGuest([active(10, 0)])
    with pytest.raises(RuntimeError, match="did not end within 0 s; cancelled"):
        mh.watch_migration(source, "memvisor hints-off dirty", timeout=0)
    assert source.commands[-1] == ("migrate_cancel", {})


def test_the_progress_line_says_where_the_migration_is() -> None:
    line = mh.progress_line("memvisor hints-on idle", 12.4, active(2560, 20))
    assert line == ("memvisor hints-on idle:    12 s active, 300 MiB sent, 100 MiB left, pass 3, dirty 10.0 MiB/s, "
                    "throttle 20 %")  # fmt: skip


# --- one row with pretend guests ------------------------------------------------------------------------------------

ANSWERS = {"mkdir -p /mnt/f": "abc123  /mnt/f/mark\n", mh.BOOT_ID: "boot-1\n", "echo alive": "alive\n",
           "sha256sum /mnt/f/mark": "abc123  /mnt/f/mark\n"}  # fmt: skip


def pretend(monkeypatch: pytest.MonkeyPatch, source: FakeGuest, dest: FakeGuest | None) -> list[str | None]:
    """start_guest: the source at once; the destination listens on the channel, then (dest None) fails once a
    connection comes and goes unread, or returns `dest`. The incoming URIs asked for, in order."""
    asked: list[str | None] = []

    def start(case: Case, folder: Path, images: Any, incoming: str | None, timeout: float) -> FakeGuest:
        asked.append(incoming)
        if incoming is None:
            return source
        path = incoming.removeprefix("unix:")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen(1)
            if dest is not None:
                return dest
            server.settimeout(10)
            server.accept()[0].close()
        raise RuntimeError("the stream ended before its header")

    monkeypatch.setattr(mh, "start_guest", start)
    return asked


@pytest.mark.parametrize("vmm", ["memvisor", "qemu"])
def test_a_row_migrates_and_checks_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vmm: str
) -> None:
    source, dest = FakeGuest([active(0, 0), COMPLETED], ANSWERS), FakeGuest(answers=ANSWERS)
    asked = pretend(monkeypatch, source, dest)
    row = mh.migrate_case(Case(vmm, True, "dirty"), tmp_path, None, migration_timeout=60)
    channel = f"unix:{tmp_path}/mig.sock"
    assert asked == [None, channel]
    assert (
        row["checks"] == {"guest-answers": True, "same-boot": True, "file-same": True}
        and row["status"] == "completed"
    )
    names = [name for name, _ in source.commands]
    assert ("migrate-set-parameters", {"max_bandwidth": 10 * GiB, "downtime_limit": 300}) in source.commands
    assert (("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge", "state": True}]})
            in source.commands) == (vmm == "qemu")  # fmt: skip
    assert names.index("migrate-set-parameters") < names.index("migrate") < names.index("query-migrate")
    assert ("migrate", {"uri": channel}) in source.commands
    assert [c.split()[0] for c in source.ran] == ["mkdir", "cat", "dd", "mkdir", "(i=0;"]  # the writer last
    assert source.closed and dest.closed


def test_a_destination_that_reads_another_file_fails_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = FakeGuest(answers={**ANSWERS, "sha256sum /mnt/f/mark": "fff000  /mnt/f/mark\n"})
    pretend(monkeypatch, FakeGuest([COMPLETED], ANSWERS), dest)
    row = mh.migrate_case(Case("qemu", False, "idle"), tmp_path, None, migration_timeout=60)
    assert row["checks"] == {"guest-answers": True, "same-boot": True, "file-same": False}
    assert "FAILED: file-same" in mh.table_row(row)


def test_a_failed_migration_ends_its_waiting_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = {"status": "failed", "error-desc": "the connection to the destination broke", "ram": {}}
    source = FakeGuest([failed], ANSWERS)
    pretend(monkeypatch, source, None)
    row = mh.migrate_case(Case("memvisor", False, "idle"), tmp_path, None, migration_timeout=60)
    assert row["status"] == "failed" and "checks" not in row and source.closed
    assert "- memvisor hints off idle: the connection to the destination broke" in mh.table([row])


def test_a_source_that_fails_is_closed_and_no_destination_starts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    class Failing(FakeGuest):
        def check(self, command: str, timeout: float = 120) -> str:
            raise AssertionError(f"{command!r} exited 1")

    source = Failing()
    asked = pretend(monkeypatch, source, None)
    with pytest.raises(AssertionError, match="exited 1"):
        mh.migrate_case(Case("memvisor", True, "idle"), tmp_path, None, migration_timeout=60)
    assert asked == [None] and source.closed


# --- the table ------------------------------------------------------------------------------------------------------


def row(vmm: str, hinting: bool, scenario: str, mib: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"vmm": vmm, "free-page-hint": hinting, "scenario": scenario, "status": "completed",
            "transferred": mib * MiB, "ram": GiB, "ratio": round(mib / 1024, 4), "total-time-ms": int(seconds * 1000),
            "downtime-ms": 95, "passes": 4, "dirty-pages-rate-max": 2560, "page-size": 4096, "throttle-max": 0,
            "skipped": None, "checks": {"guest-answers": True, "same-boot": True, "file-same": True}} | extra  # fmt: skip


SKIPPED = {
    "free-page-hint": 153600,
    "balloon": 0,
    "virtio-mem-unplugged": 0,
    "unbacked": 70000,
    "reported": 0,
}


def test_a_row_shows_bytes_time_passes_rate_and_skips() -> None:
    line = mh.table_row(row("memvisor", True, "idle", 150, 31.25, skipped=SKIPPED))
    assert line == ("| memvisor | on | idle | completed | 150.0 (0.15x RAM) | 31.2 | 95 | 4 | 10.0 | 0 | "
                    "free-page-hint 153600 (600 MiB), unbacked 70000 (273 MiB) | ok |")  # fmt: skip
    assert mh.table_row(row("qemu", False, "idle", 700, 40)).endswith("| 10.0 | 0 | - | ok |")
    error = mh.failed_row(Case("qemu", True, "dirty"), RuntimeError("boot"))
    assert mh.table_row(error) == "| qemu | on | dirty | error | - | - | - | - | - | - | - | - |"
    assert mh.table_row(row("memvisor", False, "idle", 1, 1, skipped={"unbacked": 0})).count("| none |") == 1


def test_the_goals_over_the_completed_rows() -> None:
    rows = [row("memvisor", False, "idle", 700, 40), row("qemu", False, "idle", 720, 38),
            row("memvisor", True, "idle", 150, 30), row("qemu", True, "idle", 300, 35),
            row("memvisor", True, "dirty", 900, 80), row("memvisor", False, "dirty", 1300, 90),
            {**row("qemu", True, "dirty", 0, 0), "status": "failed", "error": "timeout"}]  # fmt: skip
    text = mh.table(rows)
    lines = text.splitlines()
    assert lines[0] == mh.HEADER and lines[1] == "|" + "---|" * 12 and len(lines[0].split(" | ")) == 12
    goals = text.split("Goals:\n")[1].split("\n\nFailures:\n")
    assert goals[0].splitlines() == [
        "- idle: memvisor with hints sends 0.21x the bytes it sends without (goal <= 0.30): met",
        "- idle, hints on: memvisor sends 150.0 MiB, QEMU 300.0 MiB (goal: no more): met",
        "- idle, hints off: total time memvisor 40.0 s, QEMU 38.0 s (goal: no slower): NOT met",
        "- idle, hints on: total time memvisor 30.0 s, QEMU 35.0 s (goal: no slower): met",
        "- dirty: memvisor with hints sends 0.69x the bytes it sends without (no goal: the writer's pages go)",
        "- dirty, hints on: memvisor against QEMU bytes: not measured",
        "- dirty, hints off: total time: not measured",
        "- dirty, hints on: total time: not measured",
    ]
    assert goals[1] == "- qemu hints on dirty: timeout"
    assert mh.goals([])[0] == "- idle: memvisor hints on/off bytes (goal <= 0.30): not measured"


def test_table_merges_json_files_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([row("memvisor", True, "idle", 150, 30)]))
    second.write_text(json.dumps([row("qemu", True, "idle", 300, 35)]))
    monkeypatch.setattr(sys, "argv", ["migration_hints.py", "--table", str(first), str(second)])
    assert mh.main() == 0
    out = capsys.readouterr().out
    assert "| memvisor | on | idle |" in out and "| qemu | on | idle |" in out
    assert "memvisor sends 150.0 MiB, QEMU 300.0 MiB (goal: no more): met" in out
