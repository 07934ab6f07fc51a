"""Memory mechanisms, memvisor against QEMU 7.2: same kernel, initramfs, command line and 1G guest, one lab run.

Run inside the lab (or on a host with hardware KVM):
    .venv/bin/memvisor lab --memory 6G --share /tmp/membench -- \\
        .venv/bin/python benchmarks/memory_vs_qemu.py --runs 5 --json /tmp/membench/memory.json

What it measures (each `--runs` times, memvisor and QEMU alternating which goes first, medians reported, with
the number of runs behind each median and the runs that failed):
- balloon: the guest touches 600M and frees it, then `balloon` 1G -> 512M until `query-balloon` shows it
  (within 4 MiB), and back to 1G; free page reporting off;
- virtio-mem: `qom-set vm0 requested-size` 0 -> 1G until `qom-get vm0 size` reads 1G, and back to 0
  (plugged memory left untouched);
- pmem flush latency: 100 times `dd bs=4k count=1 conv=notrunc,fsync` on ext4 (no DAX) on /dev/pmem0, less the
  same loop without fsync, per write, timed by the guest's /proc/uptime;
- the raw limit, measured between the VM runs (interleaved, so load falls on both alike): punching holes
  (fallocate PUNCH_HOLE) in 512M of touched memfd memory from Python, one call per 4 KiB page (what a balloon
  buffer of scattered PFNs costs) and one per 1 MiB run; each VMM's inflate is reported against both;
- discard calls: after the timed runs, one more inflate 1G -> 512M per VMM under `strace -f -c` (attached to
  the running VMM, so not timed), counting its fallocate and madvise calls: the same count for both VMMs;
- exits reaching Python per GiB inflated and per GiB plugged (memvisor's x-query-exits; QEMU has no such count);
- free page reporting (a second pair of VMs, reporting on): the guest fills a 400M tmpfs file, the host's
  holding is read once it has settled (unchanged for 2 s), then the guest `rm`s it: seconds from `rm`
  returning until the host holds >= 300M less.

Host memory is read the same way for both VMMs, from outside the process: the blocks allocated to its guest
RAM memfd, through /proc/PID/fd (never memvisor's own x-query-host-memory). A VM that fails (an error, a timeout,
a guest reboot detected by its uptime) is shut down at once and takes no more runs; the other goes on, and the
table shows what was measured. Every wait names what it waited for and what it saw last.

The guest image has no virtio_pci module (memvisor puts its devices on virtio-mmio), so both VMMs get the same
initrd with virtio_pci appended as a second cpio archive; in QEMU's guest the agent (on ttyS1) insmods it.
QEMU boots without `pci=off`, its devices being on PCI; otherwise the command line is memvisor's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import mmap
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memvisor.guest.image import GuestImage, find_guest_image  # noqa: E402
from tests.guest.qemu_vm import (  # noqa: E402
    BALLOON_BOUND,
    PMEM_BOUND,
    VIRTIO_MEM_BOUND,
    AgentSocket,
    QemuMachine,
    balloon_device,
    connect_qmp,
    initrd_with_virtio_pci,
    pmem_device,
    qemu_cmdline,
    virtio_mem_device,
    wait_for_virtio_devices,
)
from tests.guest.vm import memfd_bytes  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
GUEST_RAM = 1 * GiB
BALLOON_TARGET = 512 * MiB
PLUG = 1 * GiB
PMEM_SIZE = 256 * MiB
POLL = 0.05  # seconds between QMP polls while waiting for a change


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, seen: Callable[[], Any] | None = None) -> Any:
    """Poll until `predicate` is truthy; on timeout say what was awaited and what `seen` (or it) read last."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            last = seen() if seen is not None else value
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {last!r}")
        time.sleep(POLL)


def wait_settled(read: Callable[[], int], what: str, stable: float = 2.0, timeout: float = 120) -> int:
    """Wait until `read()` has not changed for `stable` seconds (polled every 0.5 s); return the value."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < stable:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} never settled for {stable:.0f} s within {timeout:.0f} s; last {value}")
        time.sleep(0.5)
        current = read()
        if current != value:
            value, since = current, time.monotonic()
    return value


# --- the two VMMs behind one interface ----------------------------------------------------------------------------


class Vm:
    """One running guest with its QMP connection; subclasses say how to spawn, exec and read host memory."""

    name = "?"
    process: subprocess.Popen[bytes]
    qmp: QEMUMonitorProtocol

    def cmd(self, name: str, **arguments: Any) -> Any:
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        reply = self.qmp.cmd_obj({"execute": name, "arguments": args} if args else {"execute": name})
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {name} {args}: {reply['error']}")
        return reply["return"]

    def exec(self, command: str, timeout: float = 300) -> tuple[int, str]:
        raise NotImplementedError

    def check(self, command: str, timeout: float = 300) -> str:
        status, output = self.exec(command, timeout)
        if status != 0:
            raise RuntimeError(f"{self.name}: {command!r} exited {status}: {output[-500:]}")
        return output

    def host_ram(self) -> int:
        raise NotImplementedError

    def exits(self) -> dict[str, int] | None:
        return None

    def pmem_flushes(self) -> int | None:
        return None

    def close(self) -> None:
        """Quit the VMM (kill it if it does not end within 30 s); safe on a VM that failed half-way up."""
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.cmd_obj({"execute": "quit"})
                qmp.close()
        process = getattr(self, "process", None)
        if process is None:
            return
        try:
            process.wait(timeout=30 if qmp is not None else 0.1)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _started(self, start: Callable[[], None]) -> None:
        """Run the rest of the start-up; on any failure shut the VMM down before raising."""
        try:
            start()
        except BaseException:
            log(f"{self.name}: start-up failed, shutting the VMM down")
            self.close()
            raise


_connect_qmp = connect_qmp  # the name snapshot_vs_qemu.py and tests/guest/manual_manager_check.py import


class MemvisorVm(Vm):
    name = "memvisor"

    def __init__(self, work: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None,
                 hinting: bool = False) -> None:  # fmt: skip
        sock = work / "mv-qmp.sock"
        balloon = "virtio-balloon,id=balloon0" + (",free-page-reporting=on" if reporting else "")
        balloon += ",free-page-hint=on" if hinting else ""
        argv = [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", "1G", "--kernel", str(kernel),
                "--initrd", str(initrd), "--qmp", str(sock), "--console", str(work / "mv-console.log"),
                "--device", balloon]  # fmt: skip
        if pmem is not None:
            argv += ["--device", "virtio-mem,id=vm0,max-size=2G", "--device", f"virtio-pmem,id=pm0,file={pmem}"]
        self.process = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=(work / "mv-stderr.log").open("wb"))  # fmt: skip

        def start() -> None:
            self.qmp = _connect_qmp(sock, self.process, 240)
            self.check("true", 300)

        self._started(start)

    def exec(self, command: str, timeout: float = 300) -> tuple[int, str]:
        reply = self.cmd("x-guest-exec", command=command, timeout=timeout)
        output = base64.b64decode(reply["out-data"]) + base64.b64decode(reply["err-data"])
        return int(reply["exitcode"]), output.decode(errors="replace")

    def host_ram(self) -> int:
        """From outside the process, as for QEMU: blocks of its RAM memfds ("memvisor-ram0", ...)."""
        return memfd_bytes(self.process.pid, lambda name: name.startswith("memvisor-ram"))

    def exits(self) -> dict[str, int] | None:
        reply = self.cmd("x-query-exits")
        return {item["kind"]: int(item["count"]) for item in reply["kinds"]}

    def pmem_flushes(self) -> int | None:
        counters = self.cmd("x-query-pmem")[0]["counters"]
        return int(counters["flush-requests"])


class QemuVm(Vm):
    name = "qemu"

    def __init__(self, work: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None) -> None:
        devices = balloon_device(reporting=reporting)
        if pmem is not None:
            devices += virtio_mem_device(2 * GiB) + pmem_device(pmem, PMEM_SIZE)
        machine = QemuMachine(kernel=kernel, initrd=initrd, cmdline=qemu_cmdline(), memory=GUEST_RAM, work=work,
                              maxmem=4 * GiB, devices=devices)  # fmt: skip
        self.process = subprocess.Popen(machine.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=machine.stderr.open("wb"))  # fmt: skip
        self._started(lambda: self._start(machine, pmem))

    def _start(self, machine: QemuMachine, pmem: Path | None) -> None:
        self.qmp = _connect_qmp(machine.qmp_socket, self.process, 60)
        self.agent = AgentSocket(machine.agent_socket, 300)
        log("qemu: the agent answers; waiting for its virtio-pci devices")
        wait_for_virtio_devices(self.exec, [BALLOON_BOUND] + ([VIRTIO_MEM_BOUND, PMEM_BOUND] if pmem is not None else []))
        log("qemu: devices bound")
        self._ram_fd = self._find_ram_memfd()

    def _find_ram_memfd(self) -> Path:
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith("/memfd:") and os.stat(fd).st_size == GUEST_RAM:
                    return fd
        raise RuntimeError("cannot find QEMU's RAM memfd in /proc/PID/fd")

    def exec(self, command: str, timeout: float = 300) -> tuple[int, str]:
        return self.agent.exec(command, timeout)

    def host_ram(self) -> int:
        return os.stat(self._ram_fd).st_blocks * 512

    def close(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            with contextlib.suppress(Exception):
                agent.sock.close()
        super().close()


# --- the measurements ---------------------------------------------------------------------------------------------


def _exit_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def guest_uptime(vm: Vm) -> float:
    return float(vm.check("cat /proc/uptime").split()[0])


def measure_balloon(vm: Vm) -> dict[str, Any]:
    log(f"{vm.name}: balloon")
    vm.check("dd if=/dev/zero of=/dev/null bs=600M count=1")  # touch 600M, then free it
    exits = vm.exits()
    started = time.monotonic()
    vm.cmd("balloon", value=BALLOON_TARGET)
    wait_for(lambda: vm.cmd("query-balloon")["actual"] <= BALLOON_TARGET + 4 * MiB, 600,
             f"{vm.name}: the inflate to {BALLOON_TARGET >> 20} MiB", lambda: vm.cmd("query-balloon"))  # fmt: skip
    inflate = time.monotonic() - started
    inflate_exits = _exit_delta(exits, vm.exits())
    started = time.monotonic()
    vm.cmd("balloon", value=GUEST_RAM)
    wait_for(lambda: vm.cmd("query-balloon")["actual"] >= GUEST_RAM - 4 * MiB, 600,
             f"{vm.name}: the deflate to {GUEST_RAM >> 20} MiB", lambda: vm.cmd("query-balloon"))  # fmt: skip
    deflate = time.monotonic() - started
    return {"inflate": inflate, "deflate": deflate, "inflate_exits": inflate_exits}


def measure_mem(vm: Vm) -> dict[str, Any]:
    log(f"{vm.name}: virtio-mem")
    exits = vm.exits()
    started = time.monotonic()
    vm.cmd("qom-set", path="vm0", property="requested-size", value=PLUG)
    size = lambda: vm.cmd("qom-get", path="vm0", property="size")  # noqa: E731
    wait_for(lambda: size() == PLUG, 600, f"{vm.name}: vm0 size {PLUG >> 20} MiB (the plug)", size)
    plug = time.monotonic() - started
    plug_exits = _exit_delta(exits, vm.exits())
    started = time.monotonic()
    vm.cmd("qom-set", path="vm0", property="requested-size", value=0)
    wait_for(lambda: size() == 0, 600, f"{vm.name}: vm0 size 0 (the unplug)", size)
    unplug = time.monotonic() - started
    return {"plug": plug, "unplug": unplug, "plug_exits": plug_exits}


def setup_pmem(vm: Vm) -> None:
    vm.check("mkfs.ext4 -q -F -b 4096 /dev/pmem0 && mkdir -p /mnt/pmem && mount -t ext4 /dev/pmem0 /mnt/pmem")


PMEM_LOOP = (
    "cd /mnt/pmem && rm -f f g && sync\n"
    "t() {{ read -r up _ < /proc/uptime; echo $up; }}\n"
    "a=$(t); i=0; while [ $i -lt {n} ]; do dd if=/dev/zero of=f bs=4k count=1 seek=$i conv=notrunc,fsync 2>/dev/null"
    "; i=$((i + 1)); done\n"
    "b=$(t); i=0; while [ $i -lt {n} ]; do dd if=/dev/zero of=g bs=4k count=1 seek=$i conv=notrunc 2>/dev/null"
    "; i=$((i + 1)); done\n"
    "c=$(t); echo $a $b $c"
)


def measure_pmem(vm: Vm, writes: int = 100) -> dict[str, Any]:
    """Per-write cost of fsync after a 4 KiB write (busybox dd has no oflag=dsync): a loop of `dd conv=fsync`
    less the same loop without fsync (both pay for starting dd), timed by the guest's /proc/uptime."""
    flushes = vm.pmem_flushes()
    output = vm.check(PMEM_LOOP.format(n=writes))
    after = vm.pmem_flushes()
    found = re.search(r"^([\d.]+) ([\d.]+) ([\d.]+)$", output, re.MULTILINE)
    if found is None:  # e.g. the guest rebooted and /mnt/pmem is gone
        raise RuntimeError(f"{vm.name}: the pmem loop printed no times: {output[-300:]!r}")
    a, b, c = (float(word) for word in found.groups())
    return {
        "pmem_write": ((b - a) - (c - b)) / writes,
        "pmem_write_with_dd": (b - a) / writes,
        "flushes_per_write": None if flushes is None or after is None else (after - flushes) / writes,
    }


def measure_reporting(vm: Vm) -> dict[str, Any]:
    vm.check("dd if=/dev/zero of=/tmp/fill bs=1M count=400 2>/dev/null")
    # Reporting of whatever was free before may still be going on: wait until the host's holding settles.
    baseline = wait_settled(vm.host_ram, f"{vm.name}: host memory after the 400M write")
    vm.check("rm /tmp/fill")
    started = time.monotonic()
    wait_for(lambda: vm.host_ram() <= baseline - 300 * MiB, 120,
             f"{vm.name}: free page reporting to return 300M of {baseline >> 20} MiB",
             lambda: f"host holds {vm.host_ram() >> 20} MiB")  # fmt: skip
    return {"reporting": time.monotonic() - started}


DISCARD_CALLS = ("fallocate", "madvise")


def count_syscalls(pid: int, action: Callable[[], Any], out: Path) -> dict[str, int]:
    """Run `action` with `strace -f -c` attached to every thread of `pid`; its calls of DISCARD_CALLS.

    The same count for both VMMs, from outside (ptrace slows the traced process: never around a timed run).
    """
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-c", "-e", f"trace={','.join(DISCARD_CALLS)}", "-o", str(out),
                               "-p", str(pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip

    def tracers() -> set[str]:
        found = set()
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            with contextlib.suppress(OSError):
                found |= {line.split()[1] for line in status.read_text().splitlines() if line.startswith("TracerPid:")}
        return found

    try:
        wait_for(lambda: tracers() == {str(tracer.pid)} or tracer.poll() is not None, 60,
                 f"strace to attach to every thread of {pid}", tracers)  # fmt: skip
        if tracer.poll() is not None:
            raise RuntimeError(f"strace exited with {tracer.returncode}: is it installed and allowed to attach?")
        action()
    finally:
        tracer.send_signal(signal.SIGINT)  # detach and write the summary
        try:
            tracer.wait(60)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    counts = dict.fromkeys(DISCARD_CALLS, 0)
    for line in out.read_text().splitlines():
        words = line.split()
        if words and words[-1] in counts:
            counts[words[-1]] = int(words[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    return counts


def measure_discards(vm: Vm, work: Path) -> dict[str, Any]:
    """Discard calls of one untimed inflate 1G -> 512M (after touching 600M), counted by strace."""
    log(f"{vm.name}: counting discard calls of one inflate (strace, not timed)")
    vm.check("dd if=/dev/zero of=/dev/null bs=600M count=1")

    def inflate() -> None:
        vm.cmd("balloon", value=BALLOON_TARGET)
        wait_for(lambda: vm.cmd("query-balloon")["actual"] <= BALLOON_TARGET + 4 * MiB, 1200,
                 f"{vm.name}: the counted inflate", lambda: vm.cmd("query-balloon"))  # fmt: skip

    counts = count_syscalls(vm.process.pid, inflate, work / f"strace-{vm.name}.txt")
    vm.cmd("balloon", value=GUEST_RAM)
    wait_for(lambda: vm.cmd("query-balloon")["actual"] >= GUEST_RAM - 4 * MiB, 1200,
             f"{vm.name}: the deflate after the counted inflate", lambda: vm.cmd("query-balloon"))  # fmt: skip
    return {"discards": counts}


# --- the raw limit ------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_holes(size: int, step: int) -> float:
    """Seconds to punch `size` bytes of touched memfd memory in holes of `step` bytes, one fallocate each."""
    fd = os.memfd_create("membench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as view:
            for offset in range(0, size, 4096):
                view[offset] = 1
        fallocate, mode = _libc.fallocate, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        started = time.perf_counter()
        for offset in range(0, size, step):
            if fallocate(fd, mode, offset, step) != 0:
                raise OSError(ctypes.get_errno(), "fallocate")
        elapsed = time.perf_counter() - started
        assert os.fstat(fd).st_blocks == 0
        return elapsed
    finally:
        os.close(fd)


# --- the run ------------------------------------------------------------------------------------------------------


def boot_pair(work: Path, image: GuestImage, initrd: Path, *, reporting: bool,
              results: dict[str, dict[str, list[Any]]]) -> list[Vm]:
    """Boot memvisor's and QEMU's guest side by side (in parallel: the lab is slow); a VMM that fails to boot is
    recorded in results[name]["failures"] and left out, the other goes on alone."""
    vms: list[Vm | None] = [None, None]
    errors: list[BaseException] = []

    def boot(index: int, cls: type[MemvisorVm] | type[QemuVm]) -> None:
        folder = work / f"{cls.name}-{'fpr' if reporting else 'main'}"
        folder.mkdir()
        pmem = None
        if not reporting:
            pmem = folder / "pmem.img"
            with pmem.open("wb") as file:
                file.truncate(PMEM_SIZE)
        try:
            vms[index] = cls(folder, image.kernel, initrd, reporting=reporting, pmem=pmem)
        except BaseException as err:  # reported below, after both threads are done
            errors.append(err)
            log(f"{cls.name}: FAILED to boot: {err!r}")
            for console in sorted(folder.glob("*console*.log")):  # what the guest's kernel said last
                tail = console.read_text(errors="replace").splitlines()[-25:]
                log(f"{cls.name}: the end of {console.name}:\n" + "\n".join(tail))
            results[cls.name].setdefault("failures", []).append(f"boot ({'reporting' if reporting else 'main'}): {err}")

    threads = [threading.Thread(target=boot, args=(i, cls)) for i, cls in enumerate((MemvisorVm, QemuVm))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    booted = [vm for vm in vms if vm is not None]
    if errors and not booted:
        raise RuntimeError(f"neither VMM booted: {errors[0]}")
    return booted


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, dict[str, list[Any]]], raw: dict[str, list[float]]) -> str:
    """The table of whatever was measured: a row with no samples for a VMM shows "-" there."""
    mv, qm = results["memvisor"], results["qemu"]

    def cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
        return f"{fmt.format(median(values) * scale)} (n={len(values)})" if values else "- (n=0)"

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{median(a) / median(b):.2f}" if a and b and median(b) else "-"

    rows = []

    def row(what: str, key: str, fmt: str = "{:.2f}", scale: float = 1.0) -> None:
        rows.append(f"| {what} | {cell(mv[key], fmt, scale)} | {cell(qm[key], fmt, scale)} | {ratio(mv[key], qm[key])} |")

    row("balloon inflate 1G -> 512M (s)", "inflate")
    row("balloon deflate 512M -> 1G (s)", "deflate")
    row("virtio-mem plug 0 -> 1G (s)", "plug")
    row("virtio-mem unplug 1G -> 0 (s)", "unplug")
    row("free page reporting: rm of 400M to host -300M (s)", "reporting")
    row("pmem: fsync of a 4 KiB write on ext4, less the write (ms)", "pmem_write", "{:.2f}", 1000)
    row("pmem: whole `dd bs=4k count=1 conv=fsync` (ms)", "pmem_write_with_dd", "{:.2f}", 1000)

    def discards(samples: list[dict[str, int]]) -> str:
        if not samples:
            return "-"
        return ", ".join(f"{name} {samples[-1].get(name, 0)}" for name in DISCARD_CALLS)

    rows.append(f"| discard calls in one inflate 1G -> 512M (strace) | {discards(mv['discards'])} | "
                f"{discards(qm['discards'])} | - |")  # fmt: skip

    def exits_per_gib(samples: list[dict[str, int] | None], size: int) -> str:
        totals = [sum(s.values()) for s in samples if s is not None]
        return f"{median(totals) * GiB / size:.0f}" if totals else "-"

    rows.append(f"| exits to Python per GiB inflated | {exits_per_gib(mv['inflate_exits'], GUEST_RAM - BALLOON_TARGET)}"
                " | - | - |")  # fmt: skip
    rows.append(f"| exits to Python per GiB plugged | {exits_per_gib(mv['plug_exits'], PLUG)} | - | - |")
    lines = [
        "| what (median, n = runs behind it; 1G guest, 1 vCPU) | memvisor | QEMU 7.2 | memvisor/QEMU |",
        "|---|---|---|---|",
        *rows,
        "",
        "| raw limit: fallocate(PUNCH_HOLE) over 512M of touched memfd, Python+ctypes, between the VM runs | s | "
        "memvisor inflate / it | QEMU inflate / it |",
        "|---|---|---|---|",
    ]
    for key, what in (("4k", "one call per 4 KiB page"), ("1m", "one call per 1 MiB run")):
        limit = raw.get(key, [])
        lines.append(f"| {what} | {cell(limit, '{:.3f}')} | {ratio(mv['inflate'], limit)} | {ratio(qm['inflate'], limit)} |")
    for name in ("memvisor", "qemu"):
        for failure in results[name].get("failures", []):
            lines.append(f"\n{name} FAILED: {failure}")
    return "\n".join(lines)


@contextlib.contextmanager
def _keep_logs(work: Path, into: Path | None) -> Iterator[None]:
    try:
        yield
    finally:
        if into is not None:
            into.mkdir(parents=True, exist_ok=True)
            for path in [*work.glob("*/*.log"), *work.glob("strace-*.txt")]:
                shutil.copy(path, into / f"{path.parent.name}-{path.name}")


KEYS = ("inflate", "deflate", "inflate_exits", "plug", "unplug", "plug_exits", "pmem_write", "pmem_write_with_dd",
        "flushes_per_write", "reporting", "discards")  # fmt: skip


def main() -> int:
    global POLL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here (after every run)")
    parser.add_argument("--phases", default="main,reporting",
                        help="what to run: main (balloon, virtio-mem, pmem, raw limit, discard counts), reporting, "
                             "balloon (alone)")  # fmt: skip
    parser.add_argument("--poll", type=float, default=POLL, help="seconds between QMP polls while waiting")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: merge these --json files and print the table")
    parser.add_argument("--logs", type=Path, help="copy the VMs' console and stderr logs into this folder at the end")
    args = parser.parse_args()
    if args.table:
        return print_merged(args.table)
    image = find_guest_image("default")
    if image is None:
        sys.exit("no guest image: run `memvisor image build` on the host first")
    phases = set(args.phases.split(","))
    POLL = args.poll
    results: dict[str, dict[str, list[Any]]] = {name: {key: [] for key in KEYS} for name in ("memvisor", "qemu")}
    raw: dict[str, list[float]] = {"4k": [], "1m": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"runs": args.runs, "results": results, "raw": raw}, indent=1))

    status = 0
    try:
        with tempfile.TemporaryDirectory(prefix="membench-") as tmp, _keep_logs(Path(tmp), args.logs):
            work = Path(tmp)
            initrd = initrd_with_virtio_pci(image, work / "initrd.img")
            for phase, run in (("main", run_main), ("balloon", run_balloon), ("reporting", run_reporting)):
                if phase not in phases:
                    continue
                try:
                    run(work, image, initrd, args.runs, results, raw, save)
                except Exception as err:  # a phase that fails leaves the others and the partial table
                    log(f"phase {phase} FAILED: {err}")
                    for name in results:
                        results[name].setdefault("failures", []).append(f"phase {phase}: {err}")
                    status = 1
    finally:
        save()
        print(table(results, raw))
    return status


Results = dict[str, dict[str, list[Any]]]


def _failed(vm: Vm, what: str, err: BaseException, results: Results, vms: list[Vm]) -> None:
    """A VM that fails is shut down at once (before the other goes on) and takes no more runs."""
    log(f"{what} {vm.name}: FAILED, shutting it down, no more runs for it: {err}")
    results[vm.name].setdefault("failures", []).append(f"{what}: {err}")
    vm.close()
    vms.remove(vm)


def run_main(work: Path, image: GuestImage, initrd: Path, runs: int, results: Results,
             raw: dict[str, list[float]], save: Callable[[], None]) -> None:
    log("booting memvisor and QEMU (balloon, virtio-mem, virtio-pmem)")
    booted = time.monotonic()
    vms = boot_pair(work, image, initrd, reporting=False, results=results)
    log(f"{[vm.name for vm in vms]} up after {time.monotonic() - booted:.0f} s")
    try:
        for vm in list(vms):
            try:
                setup_pmem(vm)
            except Exception as err:
                _failed(vm, "pmem set-up", err, results, vms)
        for run in range(runs):
            for vm in list(vms if run % 2 == 0 else vms[::-1]):
                try:
                    sample: dict[str, Any] = {}
                    for step in (measure_balloon, measure_mem, measure_pmem):
                        up = guest_uptime(vm)
                        sample.update(step(vm))
                        if guest_uptime(vm) < up:
                            raise RuntimeError(f"the guest rebooted during {step.__name__}")
                except Exception as err:  # one VMM failing must not lose the other's numbers
                    _failed(vm, f"run {run + 1}", err, results, vms)
                    continue
                for key, value in sample.items():
                    results[vm.name][key].append(value)
                log(f"run {run + 1} {vm.name:8s} inflate {sample['inflate']:6.2f} s deflate {sample['deflate']:6.2f}"
                    f" s plug {sample['plug']:6.2f} s unplug {sample['unplug']:6.2f} s pmem "
                    f"{sample['pmem_write'] * 1000:6.2f} ms exits {sample['inflate_exits']} / {sample['plug_exits']}")
                save()
            # The raw limit between the VM runs, so that the load of the moment falls on it too.
            raw["4k"].append(punch_holes(512 * MiB, 4096))
            raw["1m"].append(punch_holes(512 * MiB, MiB))
            log(f"run {run + 1} raw punch 4k {raw['4k'][-1]:.3f} s, 1m {raw['1m'][-1]:.3f} s")
            save()
        for vm in list(vms):
            try:
                results[vm.name]["discards"].append(measure_discards(vm, work)["discards"])
                log(f"{vm.name}: discard calls {results[vm.name]['discards'][-1]}")
            except Exception as err:
                _failed(vm, "discard count", err, results, vms)
            save()
    finally:
        for vm in vms:
            vm.close()


def run_balloon(work: Path, image: GuestImage, initrd: Path, runs: int, results: Results,
                raw: dict[str, list[float]], save: Callable[[], None]) -> None:
    """The balloon alone, polling every 0.05 s and every 0.5 s in turn: each QMP poll is Python work inside
    memvisor's process (the GIL its vCPU thread needs), while QEMU answers QMP in C off its vCPU thread."""
    global POLL
    log("booting memvisor and QEMU (balloon only)")
    vms = boot_pair(work, image, initrd, reporting=False, results=results)
    try:
        for run in range(runs):
            for vm in list(vms if run % 2 == 0 else vms[::-1]):
                try:
                    for POLL in (0.05, 0.5):
                        sample = measure_balloon(vm)
                        for key in ("inflate", "deflate"):
                            results[vm.name].setdefault(f"{key}@{POLL}", []).append(sample[key])
                        log(f"run {run + 1} {vm.name:8s} poll {POLL} s: inflate {sample['inflate']:6.2f} s "
                            f"deflate {sample['deflate']:6.2f} s")
                        save()
                except Exception as err:
                    _failed(vm, f"balloon run {run + 1}", err, results, vms)
    finally:
        for vm in vms:
            vm.close()


def run_reporting(work: Path, image: GuestImage, initrd: Path, runs: int, results: Results,
                  raw: dict[str, list[float]], save: Callable[[], None]) -> None:
    log("booting memvisor and QEMU (balloon with free page reporting)")
    vms = boot_pair(work, image, initrd, reporting=True, results=results)
    try:
        for run in range(runs):
            for vm in list(vms if run % 2 == 0 else vms[::-1]):
                try:
                    sample = measure_reporting(vm)
                except Exception as err:
                    _failed(vm, f"reporting run {run + 1}", err, results, vms)
                    continue
                results[vm.name]["reporting"].append(sample["reporting"])
                log(f"run {run + 1} {vm.name:8s} reporting {sample['reporting']:6.2f} s")
                save()
    finally:
        for vm in vms:
            vm.close()


def print_merged(paths: list[Path]) -> int:
    """Merge the result lists of several --json files (e.g. a main and a reporting run) and print the table."""
    results: dict[str, dict[str, list[Any]]] = {}
    raw: dict[str, list[float]] = {}
    for path in paths:
        data = json.loads(path.read_text())

        for name, lists in data["results"].items():
            for key, values in lists.items():
                results.setdefault(name, {}).setdefault(key, []).extend(values)
        for key, values in data["raw"].items():
            raw.setdefault(key, []).extend(values)
    for name in ("memvisor", "qemu"):
        for key in KEYS:
            results.setdefault(name, {}).setdefault(key, [])
    print(table(results, raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
