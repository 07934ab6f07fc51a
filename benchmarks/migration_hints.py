"""Live migration of a 1G guest that filled 600M of tmpfs and freed it, memvisor to memvisor and QEMU 7.2 to
QEMU 7.2 over unix:, free page hinting off and on, the guest idle or writing: bytes sent, time, downtime, passes,
dirty rate and (memvisor) the pages skipped by reason.

Run inside the lab (or on a host with hardware KVM):
    mkdir -p /tmp/migbench && .venv/bin/memvisor lab --memory 6G --timeout 5400 --share /tmp/migbench -- \\
        .venv/bin/python benchmarks/migration_hints.py --json /tmp/migbench/migration.json --logs /tmp/migbench/logs
    .venv/bin/python benchmarks/migration_hints.py --table /tmp/migbench/migration.json   # the table again

The JSON is rewritten after every row, so a lab stopped at its --timeout keeps the rows done. A row takes about
4-6 min idle and 6-12 min dirty in the lab (estimates, not measured: boots of 1-1.5 min, 600M of random fill at
6-9 MB/s under TCG, the migration itself), so the whole run 40-70 min.

`--only WORD,...` runs a subset (one lab hold each; merge their JSON files with --table A.json B.json): each
word is a VMM (memvisor, qemu), a scenario (idle, dirty) or a hint setting (hints-off, hints-on), and a row
runs when it matches every kind named, e.g. `--only qemu,dirty` runs QEMU's two dirty rows. Rows run scenario
by scenario, hints off then on, memvisor then QEMU, so load drifts fall on both VMMs alike.

Each row boots a source (1G, 1 vCPU, a balloon with `free-page-hint` off or on), writes a 16M random file
(its sha256 and the boot_id taken), fills 600M of tmpfs with random data and removes it; the dirty scenario
then starts a loop in the guest that rewrites a 200M tmpfs file in place (dd conv=notrunc from a second 200M
file) without end. The destination starts with the same devices and `--incoming unix:PATH` (memvisor) or
`-incoming unix:PATH` (QEMU); the source gets `migrate`, and query-migrate is polled every 0.5 s (a progress
line every 10 s) until "completed" or "failed" (or --migration-timeout, then migrate_cancel). Reported:
- RAM transferred: ram.transferred as each VMM counts it (memvisor its whole stream, machine state included;
  QEMU its RAM section), against RAM;
- total-time and downtime; passes: ram.dirty-sync-count;
- dirty rate and throttle: the highest ram.dirty-pages-rate (times page-size) and cpu-throttle-percentage
  seen while active (QEMU 7.2's reply once completed need not carry them);
- memvisor's x-skipped-pages by reason (QEMU counts no such thing).
Then the destination's guest must answer (memvisor's x-guest-exec; QEMU's agent on its virtio-console) in the
same boot (boot_id) with the file's sha256 unchanged: the row's "destination checks".

The same settings on both VMMs: `migrate-set-parameters` downtime-limit 300 ms (both defaults) and
max-bandwidth 10 GiB/s. For memvisor 0 means unlimited (memvisor/migration/source.py; its default is 128 MiB/s);
QEMU 7.2's reading of 0 is not relied on: 10 GiB/s is far above what a unix socket carries in the lab, so
neither VMM ever waits on its limit. QEMU gets the `auto-converge` capability: memvisor always throttles a
migration that does not converge (memvisor/migration/throttle.py, QEMU's defaults: 20 % from pass 4, +10 % a
pass, at most 99 %) and ends pre-copy after 30 passes, so without it QEMU's dirty rows need not end. QEMU's
free page hinting needs no capability: its balloon (`free-page-hint=on`, in an iothread) hints during pre-copy
by itself. QEMU's guest is memvisor's (kernel, initrd with virtio_pci appended, command line less `pci=off`:
tests/guest/qemu_vm.py).

Goals (issue 9), printed under the table from whatever rows completed: with hints memvisor sends <= 0.3x the
bytes it sends without (idle); with hints memvisor sends no more bytes than QEMU with hints; memvisor's total
time is no longer than QEMU's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.guest.qemu_vm import (  # noqa: E402
    BALLOON_BOUND,
    QemuGuest,
    QemuMachine,
    balloon_device,
    initrd_with_virtio_pci,
    log,
    qemu_cmdline,
)
from tests.guest.vm import GuestVM, wait_until  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
GUEST_RAM = 1 * GiB
MAX_BANDWIDTH = 10 * GiB  # bytes/s, on both VMMs: see the docstring
DOWNTIME_LIMIT_MS = 300
POLL = 0.5  # seconds between query-migrate polls
PROGRESS_EVERY = 10.0  # seconds between progress lines while a migration runs
BOOT_TIMEOUT = 600.0
SETTLE = 2.0  # seconds between the guest's preparation and the destination's start (as before)
VMMS = ("memvisor", "qemu")
SCENARIOS = ("idle", "dirty")
HINTS = {"hints-off": False, "hints-on": True}

MARK = "/mnt/f/mark"
MARK_FILE = ("mkdir -p /mnt/f && mount -t tmpfs -o size=700M tmpfs /mnt/f && "
             f"dd if=/dev/urandom of={MARK} bs=1M count=16 2>/dev/null && sha256sum {MARK}")  # fmt: skip
FILL_AND_FREE = "dd if=/dev/urandom of=/mnt/f/fill bs=1M count=600 2>/dev/null && rm /mnt/f/fill && sync"
WRITER_FILES = ("mkdir -p /mnt/w && mount -t tmpfs -o size=450M tmpfs /mnt/w && "
                "dd if=/dev/urandom of=/mnt/w/src bs=1M count=200 2>/dev/null && cp /mnt/w/src /mnt/w/dst")  # fmt: skip
WRITER = ("(i=0; while true; do dd if=/mnt/w/src of=/mnt/w/dst bs=1M conv=notrunc 2>/dev/null; i=$((i+1)); "
          "echo $i > /mnt/w/loops; done) >/dev/null 2>&1 </dev/null &")  # fmt: skip
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class Case:
    """One row of the table: which VMM migrates, with free page hinting or not, in which scenario."""

    vmm: str
    hinting: bool
    scenario: str

    @property
    def label(self) -> str:
        return f"{self.vmm} {'hints-on' if self.hinting else 'hints-off'} {self.scenario}"

    @property
    def folder(self) -> str:
        return self.label.replace(" ", "-")


def plan(only: str | None) -> list[Case]:
    """The rows `--only` picks (all when None), in run order; a word of no kind is a ValueError."""
    words = [word.strip() for word in (only or "").split(",") if word.strip()]
    unknown = [word for word in words if word not in (*VMMS, *SCENARIOS, *HINTS)]
    if unknown:
        raise ValueError(
            f"--only: unknown {', '.join(unknown)}; give any of {', '.join((*VMMS, *SCENARIOS, *HINTS))}"
        )
    vmms = [w for w in words if w in VMMS] or list(VMMS)
    scenarios = [w for w in words if w in SCENARIOS] or list(SCENARIOS)
    hints = [HINTS[w] for w in words if w in HINTS] or [False, True]
    return [Case(vmm, hinting, scenario) for scenario in SCENARIOS for hinting in (False, True) for vmm in VMMS
            if vmm in vmms and scenario in scenarios and hinting in hints]  # fmt: skip


# --- the guests ---------------------------------------------------------------------------------------------------


class Guest(Protocol):
    """What both GuestVM (memvisor) and QemuGuest offer."""

    def cmd(self, name: str, **arguments: Any) -> Any: ...

    def check(self, command: str, timeout: float = 120) -> str: ...

    def close(self) -> None: ...


def memvisor_guest(folder: Path, hinting: bool, incoming: str | None, timeout: float) -> GuestVM:
    devices = [f"virtio-balloon,id=balloon0,free-page-hint={'on' if hinting else 'off'}"]
    extra = ["--incoming", incoming] if incoming is not None else []
    return GuestVM(folder, memory="1G", devices=devices, extra=extra, boot_timeout=timeout)


def qemu_machine(
    folder: Path, kernel: Path, initrd: Path, hinting: bool, incoming: str | None
) -> QemuMachine:
    """QEMU's source or destination: the same command line, the destination with `-incoming`."""
    return QemuMachine(kernel=kernel, initrd=initrd, cmdline=qemu_cmdline(), memory=GUEST_RAM, work=folder,
                       devices=balloon_device(hint=hinting), incoming=incoming)  # fmt: skip


@dataclass(frozen=True)
class Images:
    """What QEMU boots (memvisor finds its own guest image)."""

    kernel: Path
    initrd: Path


def start_guest(
    case: Case, folder: Path, images: Images | None, incoming: str | None, timeout: float
) -> Guest:
    """Boot a source (incoming None) or start a destination and return once its guest answers (for a
    destination: once a migration has come in)."""
    folder.mkdir(parents=True, exist_ok=True)
    if case.vmm == "memvisor":
        return memvisor_guest(folder, case.hinting, incoming, timeout)
    assert images is not None
    machine = qemu_machine(folder, images.kernel, images.initrd, case.hinting, incoming)
    return QemuGuest(machine, wanted=[BALLOON_BOUND], boot_timeout=timeout)


class Destination:
    """The destination, started in a thread: its constructor returns only once the migrated guest answers."""

    def __init__(self, start: Callable[[], Guest]) -> None:
        self.guest: Guest | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(start,), name="destination", daemon=True)
        self._thread.start()

    def _run(self, start: Callable[[], Guest]) -> None:
        try:
            self.guest = start()
        except BaseException as error:  # noqa: BLE001 - reported by wait()
            self.error = error

    def abandon(self, channel: Path, timeout: float = 60) -> None:
        """After a failure: a destination still waiting for the stream is given one that ends at once (a
        connection closed unread), so it fails and exits by itself instead of waiting out its timeout."""
        if self._thread.is_alive() and channel.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(channel))
        self._thread.join(timeout)
        if self.guest is not None:
            self.guest.close()

    def wait(self, timeout: float) -> Guest:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(
                f"the destination's guest did not answer within {timeout:.0f} s of the migration's end"
            )
        if self.error is not None:
            raise RuntimeError(f"the destination failed: {self.error}") from self.error
        assert self.guest is not None
        return self.guest


# --- the migration ------------------------------------------------------------------------------------------------


@dataclass
class Watch:
    """What query-migrate showed while the migration ran (QEMU drops the dirty rate once completed)."""

    dirty_pages_rate_max: int = 0
    throttle_max: int = 0
    polls: int = 0

    def see(self, info: dict[str, Any]) -> None:
        self.polls += 1
        ram = info.get("ram", {})
        self.dirty_pages_rate_max = max(self.dirty_pages_rate_max, int(ram.get("dirty-pages-rate", 0) or 0))
        self.throttle_max = max(self.throttle_max, int(info.get("cpu-throttle-percentage", 0) or 0))


def progress_line(label: str, elapsed: float, info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    rate = int(ram.get("dirty-pages-rate", 0) or 0) * int(ram.get("page-size", 4096) or 4096)
    return (f"{label}: {elapsed:5.0f} s {info.get('status', '?')}, {int(ram.get('transferred', 0)) / MiB:.0f} MiB "
            f"sent, {int(ram.get('remaining', 0)) / MiB:.0f} MiB left, pass {ram.get('dirty-sync-count', '?')}, "
            f"dirty {rate / MiB:.1f} MiB/s, throttle {info.get('cpu-throttle-percentage', 0)} %")  # fmt: skip


def watch_migration(source: Guest, label: str, timeout: float) -> tuple[dict[str, Any], Watch]:
    """Poll query-migrate until it ends; past `timeout` cancel it (and say so). The last reply and the watch."""
    watch = Watch()
    began = time.monotonic()
    last_line = began
    while True:
        info = source.cmd("query-migrate")
        watch.see(info)
        now = time.monotonic()
        if info.get("status") in ("completed", "failed", "cancelled"):
            log(progress_line(label, now - began, info))
            return info, watch
        if now - last_line >= PROGRESS_EVERY:
            log(progress_line(label, now - began, info))
            last_line = now
        if now - began > timeout:
            source.cmd("migrate_cancel")
            raise RuntimeError(f"the migration did not end within {timeout:.0f} s; cancelled; last: {info}")
        time.sleep(POLL)


def set_parameters(source: Guest, vmm: str) -> None:
    """The same limits on both VMMs; QEMU's auto-converge matches memvisor's built-in throttle (docstring)."""
    source.cmd("migrate-set-parameters", max_bandwidth=MAX_BANDWIDTH, downtime_limit=DOWNTIME_LIMIT_MS)
    if vmm == "qemu":
        source.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True}])


def prepare_source(source: Guest, scenario: str) -> dict[str, str]:
    """The marked file, the 600M filled and freed, and for `dirty` the writer; the marks to check after."""
    marks = {"sha256": source.check(MARK_FILE, 600).split()[0], "boot_id": source.check(BOOT_ID).strip()}
    source.check(FILL_AND_FREE, 1200)
    if scenario == "dirty":
        source.check(WRITER_FILES, 600)
        source.check(WRITER)
    time.sleep(SETTLE)
    return marks


def check_destination(dest: Guest, marks: dict[str, str]) -> dict[str, bool]:
    """The migrated guest answers, in the same boot, with the file written before the migration unchanged."""
    return {"guest-answers": dest.check("echo alive").strip() == "alive",
            "same-boot": dest.check(BOOT_ID).strip() == marks["boot_id"],
            "file-same": dest.check(f"sha256sum {MARK}", 300).split()[0] == marks["sha256"]}  # fmt: skip


def result_row(case: Case, info: dict[str, Any], watch: Watch) -> dict[str, Any]:
    """One JSON row from query-migrate's last reply and what was seen while it ran."""
    ram = info.get("ram", {})
    total = int(ram.get("total", 0) or 0)
    transferred = int(ram.get("transferred", 0) or 0)
    return {"vmm": case.vmm, "free-page-hint": case.hinting, "scenario": case.scenario, "status": info.get("status"),
            "error": info.get("error-desc"), "transferred": transferred, "ram": total,
            "ratio": round(transferred / total, 4) if total else None, "total-time-ms": info.get("total-time"),
            "downtime-ms": info.get("downtime"), "downtime-parts-ms": info.get("x-downtime-parts"),
            "setup-time-ms": info.get("setup-time"),
            "passes": ram.get("dirty-sync-count"), "dirty-pages-rate-max": watch.dirty_pages_rate_max,
            "dirty-pages-rate-last": ram.get("dirty-pages-rate"), "page-size": ram.get("page-size", 4096),
            "throttle-max": watch.throttle_max, "mbps": ram.get("mbps"), "normal": ram.get("normal"),
            "duplicate": ram.get("duplicate"), "skipped": ram.get("x-skipped-pages")}  # fmt: skip


def migrate_case(case: Case, work: Path, images: Images | None, migration_timeout: float) -> dict[str, Any]:
    """Run one row: boot, prepare, migrate, check the destination; the row (with "checks")."""
    channel = work / "mig.sock"
    incoming = f"unix:{channel}"
    log(f"{case.label}: booting the source")
    source = start_guest(case, work / "src", images, None, BOOT_TIMEOUT)
    destination = None
    try:
        log(f"{case.label}: source up; writing the marked file, filling 600M and freeing it"
            + ("; starting the 200M writer" if case.scenario == "dirty" else ""))  # fmt: skip
        marks = prepare_source(source, case.scenario)
        log(f"{case.label}: starting the destination")
        dest_timeout = migration_timeout + BOOT_TIMEOUT
        destination = started = Destination(
            lambda: start_guest(case, work / "dst", images, incoming, dest_timeout)
        )
        wait_until(lambda: channel.exists() or started.error is not None, timeout=120, interval=0.2,
                   what="the destination to listen")  # fmt: skip
        if started.error is not None:
            raise RuntimeError(f"the destination failed to start: {started.error}")
        set_parameters(source, case.vmm)
        log(f"{case.label}: migrate {incoming}")
        source.cmd("migrate", uri=incoming)
        info, watch = watch_migration(source, case.label, migration_timeout)
        row = result_row(case, info, watch)
        if info.get("status") != "completed":
            return row
        log(f"{case.label}: completed; waiting for the destination's guest to answer")
        destination = None
        try:
            dest = started.wait(BOOT_TIMEOUT)
            try:
                row["checks"] = check_destination(dest, marks)
            finally:
                dest.close()
        except Exception as error:  # the migration's numbers stand; the row says what failed after it
            row["checks"], row["error"] = {"guest-answers": False}, f"destination: {error}"
        log(f"{case.label}: destination checks {row['checks']}")
        return row
    finally:
        source.close()
        if destination is not None:
            destination.abandon(channel)


def keep_logs(work: Path, into: Path | None, case: Case) -> None:
    """The consoles and stderr logs of a row's VMs, into `into`/<row>/src|dst-NAME."""
    if into is None:
        return
    target = into / case.folder
    target.mkdir(parents=True, exist_ok=True)
    for path in [*work.glob("*/*.log"), *work.glob("*/*.stderr")]:
        shutil.copy(path, target / f"{path.parent.name}-{path.name}")


# --- the table ----------------------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


def _skipped(row: dict[str, Any]) -> str:
    skipped = row.get("skipped")
    if not skipped:
        return "-"
    page = int(row.get("page-size") or 4096)
    parts = [
        f"{reason} {int(count)} ({int(count) * page / MiB:.0f} MiB)"
        for reason, count in skipped.items()
        if count
    ]
    return ", ".join(parts) or "none"


def _sent(row: dict[str, Any]) -> str:
    transferred, ratio = row.get("transferred"), row.get("ratio")
    if transferred is None:
        return "-"
    return _mib(transferred) + (f" ({ratio:.2f}x RAM)" if ratio is not None else "")


def _checked(row: dict[str, Any]) -> str:
    checks = row.get("checks")
    if not checks:
        return "-"
    failed = [name for name, ok in checks.items() if not ok]
    return "FAILED: " + ", ".join(failed) if failed else "ok"


def _number(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table_row(row: dict[str, Any]) -> str:
    """One row's cells: dirty rate in MiB/s (pages/s times the page size), times in s, downtime in ms."""
    page = int(row.get("page-size") or 4096)
    cells = [row["vmm"], "on" if row["free-page-hint"] else "off", row["scenario"], str(row.get("status") or "-"),
             _sent(row), _number(row.get("total-time-ms"), 1 / 1000, 1), _number(row.get("downtime-ms")),
             _number(row.get("passes")), _number(row.get("dirty-pages-rate-max"), page / MiB, 1),
             _number(row.get("throttle-max")), _skipped(row), _checked(row)]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


HEADER = ("| VMM | free page hint | scenario | status | RAM transferred MiB | total time s | downtime ms | "
          "passes (dirty-sync-count) | dirty rate MiB/s (max) | throttle % (max) | pages skipped by reason | "
          "destination checks |")  # fmt: skip


def _completed(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, bool, str], dict[str, Any]]:
    """The last completed row of each (VMM, hinting, scenario)."""
    return {(r["vmm"], r["free-page-hint"], r["scenario"]): r for r in rows if r.get("status") == "completed"}


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 9's goals over the completed rows; a goal whose rows are missing says so."""
    done = _completed(rows)
    lines = []
    for scenario in SCENARIOS:
        off, on = done.get(("memvisor", False, scenario)), done.get(("memvisor", True, scenario))
        if off and on:
            ratio = on["transferred"] / max(off["transferred"], 1)
            verdict = (
                f"(goal <= 0.30): {_verdict(ratio <= 0.3)}"
                if scenario == "idle"
                else "(no goal: the writer's pages go)"
            )
            lines.append(
                f"- {scenario}: memvisor with hints sends {ratio:.2f}x the bytes it sends without {verdict}"
            )
        elif scenario == "idle":
            lines.append(f"- {scenario}: memvisor hints on/off bytes (goal <= 0.30): not measured")
        mv, qm = on, done.get(("qemu", True, scenario))
        if mv and qm:
            lines.append(f"- {scenario}, hints on: memvisor sends {_mib(mv['transferred'])} MiB, QEMU "
                         f"{_mib(qm['transferred'])} MiB (goal: no more): {_verdict(mv['transferred'] <= qm['transferred'])}")  # fmt: skip
        else:
            lines.append(f"- {scenario}, hints on: memvisor against QEMU bytes: not measured")
        for hinting in (False, True):
            mv, qm = done.get(("memvisor", hinting, scenario)), done.get(("qemu", hinting, scenario))
            what = f"- {scenario}, hints {'on' if hinting else 'off'}: total time"
            if mv and qm:
                lines.append(f"{what} memvisor {mv['total-time-ms'] / 1000:.1f} s, QEMU {qm['total-time-ms'] / 1000:.1f} s "
                             f"(goal: no slower): {_verdict(mv['total-time-ms'] <= qm['total-time-ms'])}")  # fmt: skip
            else:
                lines.append(f"{what}: not measured")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every row, in the order given, then the goals and any failures."""
    lines = [
        HEADER,
        "|" + "---|" * HEADER.count(" | ") + "---|",
        *(table_row(r) for r in rows),
        "",
        "Goals:",
        *goals(rows),
    ]
    failures = [f"- {r['vmm']} hints {'on' if r['free-page-hint'] else 'off'} {r['scenario']}: {r.get('error')}"
                for r in rows if r.get("status") != "completed" or r.get("error")]  # fmt: skip
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------------------------


def failed_row(case: Case, error: BaseException) -> dict[str, Any]:
    return {"vmm": case.vmm, "free-page-hint": case.hinting, "scenario": case.scenario, "status": "error",
            "error": f"{type(error).__name__}: {error}"}  # fmt: skip


def qemu_images(work: Path) -> Images:
    from memvisor.guest.image import find_guest_image

    image = find_guest_image("default")
    if image is None:
        sys.exit("no guest image: run `memvisor image build` on the host first")
    return Images(kernel=image.kernel, initrd=initrd_with_virtio_pci(image, work / "initrd.img"))


def run(
    cases: list[Case], migration_timeout: float, json_out: Path | None, logs: Path | None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="migbench-") as tmp:
        images = qemu_images(Path(tmp)) if any(case.vmm == "qemu" for case in cases) else None
        for number, case in enumerate(cases, 1):
            log(f"[{number}/{len(cases)}] {case.label} (after {time.monotonic() - began:.0f} s)")
            work = Path(tmp) / case.folder
            work.mkdir()
            started = time.monotonic()
            try:
                row = migrate_case(case, work, images, migration_timeout)
            except Exception as error:  # one row failing must not lose the others
                log(f"{case.label}: FAILED: {error!r}")
                row = failed_row(case, error)
            finally:
                keep_logs(work, logs, case)
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            log(f"[{number}/{len(cases)}] {case.label}: {json.dumps(row)}")
            if json_out is not None:
                json_out.write_text(json.dumps(rows, indent=1))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the rows here (after every row)")
    parser.add_argument(
        "--only", help="a subset: VMMs (memvisor, qemu), scenarios (idle, dirty), hints-off/hints-on"
    )
    parser.add_argument("--migration-timeout", type=float, default=1200,
                        help="seconds a migration may take before it is cancelled (default 1200)")  # fmt: skip
    parser.add_argument("--logs", type=Path, help="copy each row's console and stderr logs into this folder")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: print the table of these --json files' rows")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(table([row for path in args.table for row in json.loads(path.read_text())]))
        return 0
    try:
        cases = plan(args.only)
    except ValueError as error:
        parser.error(str(error))
    log(f"{len(cases)} rows: {', '.join(case.label for case in cases)}")
    rows = run(cases, args.migration_timeout, args.json, args.logs)
    print(table(rows), flush=True)
    return 0 if all(r.get("status") == "completed" and all(r.get("checks", {}).values()) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
