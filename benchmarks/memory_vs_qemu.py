"""Memory mechanisms, memvisor against QEMU 7.2: same kernel, initramfs, command line and 1G guest, one lab run.

Run inside the lab (or on a host with hardware KVM, as root), after `python -m compileall -q memvisor` on the host.
The main phase and the reporting phase fit one lab's --timeout each with three VMs; --table merges their JSON:
    .venv/bin/memvisor lab --memory 6G --timeout 3000 --share /tmp/membench -- env PYTHONUNBUFFERED=1 \\
        .venv/bin/python benchmarks/memory_vs_qemu.py --runs 3 --memory-backend thp \\
        --memvisor-modes exit,ioeventfd --phases main --json /tmp/membench/thp-main.json --logs /tmp/membench/thp-logs
    .venv/bin/memvisor lab --memory 6G --timeout 1500 --share /tmp/membench -- env PYTHONUNBUFFERED=1 \\
        .venv/bin/python benchmarks/memory_vs_qemu.py --runs 3 --memory-backend thp \\
        --memvisor-modes exit,ioeventfd --phases reporting --json /tmp/membench/thp-fpr.json
    .venv/bin/python benchmarks/memory_vs_qemu.py --table /tmp/membench/thp-main.json /tmp/membench/thp-fpr.json

Options beyond --runs, --phases and --json:
- `--memory-backend 4k|thp|hugetlb` (default 4k): the host pages behind guest RAM and virtio-mem's memory, the
  same for every VMM (benchmarks/backends.py): memvisor `run --memory-backend KIND`; QEMU `memory-backend-memfd`
  for both its guest RAM and virtio-mem's memdev, with `hugetlb=on,hugetlbsize=2M` for hugetlb (virtio-mem's
  memdev `reserve=off` and the device `prealloc=on`, as memvisor allocates a plugged block on hugetlbfs). QEMU
  advises MADV_HUGEPAGE on all its RAM, so the host's shmem THP decides 4k against thp: the run sets
  /sys/kernel/mm/transparent_hugepage/shmem_enabled to never (4k, hugetlb) or advise (thp) and, for hugetlb,
  reserves 2 MiB pages for every guest's RAM plus one 1G plug; both are put back at the end (needs root). The
  virtio-mem block size is 2M for both VMMs: a host page on every backend.
- `--memvisor-modes exit,ioeventfd` (default exit): which memvisor VMs run beside QEMU's. `exit` is memvisor's
  default path (every virtio queue notify an MMIO exit to Python); `ioeventfd` gets MEMVISOR_IOEVENTFD=1 in its
  environment (notifies through KVM ioeventfds, interrupts through irqfds: memvisor/vmm/ioeventfd.py). With
  both, three 1G guests boot side by side and take their turns in one rotation (who goes first moves on by one
  each run), against the same QEMU runs. `--ioeventfd` is short for `--memvisor-modes ioeventfd`.
- `--table A.json B.json`: merge --json files and print the table: a column per VMM variant, then
  memvisor/QEMU and memvisor-ioeventfd/QEMU, the backend in the heading. A file written before backends and
  ioeventfd were recorded counts as 4k, ioeventfd off; files of different backends are not merged.

What it measures (each `--runs` times, the VMs rotating which goes first, medians reported, with the number of
runs behind each median and the runs that failed):
- balloon: the guest touches 600M and frees it, then `balloon` 1G -> 512M until `query-balloon` shows it
  (within 4 MiB), and back to 1G; free page reporting off;
- virtio-mem: `qom-set vm0 requested-size` 0 -> 1G until `qom-get vm0 size` reads 1G, and back to 0
  (plugged memory left untouched);
- pmem flush latency: 100 times `dd bs=4k count=1 conv=notrunc,fsync` on ext4 (no DAX) on /dev/pmem0, less the
  same loop without fsync, per write, timed by the guest's /proc/uptime;
- the raw limit, measured between the VM runs (interleaved, so load falls on all alike): punching holes
  (fallocate PUNCH_HOLE) in 512M of touched memfd memory from Python, one call per 4 KiB page (what a balloon
  buffer of scattered PFNs costs) and one per 1 MiB run; each VMM's inflate is reported against both;
- discard calls: after the timed runs, one more inflate 1G -> 512M per VMM under `strace -f -c` (attached to
  the running VMM, so not timed), counting its fallocate and madvise calls: the same count for every VMM;
- exits reaching Python per GiB inflated and per GiB plugged (memvisor's x-query-exits; QEMU has no such count);
- free page reporting (a second set of VMs, reporting on): the guest fills a 400M tmpfs file, the host's
  holding is read once it has settled (unchanged for 2 s), then the guest `rm`s it: seconds from `rm`
  returning until the host holds >= 300M less.

Host memory is read the same way for every VMM, from outside the process: the blocks allocated to its guest
RAM memfd (st_blocks), through /proc/PID/fd (never memvisor's own x-query-host-memory, which reads the same
field). hugetlbfs pages are not in RssShmem but are counted in st_blocks, so the reading is right on every
backend; on hugetlb the memory given back goes to the host's pool of huge pages. The raw punch limit is always
a memfd of 4 KiB pages. A VM that fails (an error, a timeout, a guest reboot detected by its uptime) is shut
down at once and takes no more runs; the others go on, and the table shows what was measured. Every wait names
what it waited for and what it saw last.

The guest image has no virtio_pci module (memvisor puts its devices on virtio-mmio), so both VMMs get the same
initrd with virtio_pci appended as a second cpio archive; in QEMU's guest /init insmods it (`mvinsmod=`).
QEMU boots without `pci=off`, its devices being on PCI; otherwise the command line is memvisor's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import dataclasses
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.backends import (  # noqa: E402
    BACKENDS,
    host_pages,
    memvisor_args,
    qemu_ram_options,
    qemu_virtio_mem_options,
)
from memvisor.guest.image import GuestImage, find_guest_image  # noqa: E402
from memvisor.vmm.ioeventfd import ENV as IOEVENTFD_ENV  # noqa: E402
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


def memvisor_argv(work: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None,
                  hinting: bool = False, backend: str = "4k") -> list[str]:  # fmt: skip
    """`memvisor run` for the benchmark's guest: 1G on `backend`, QMP, a balloon, and with `pmem` virtio-mem and
    virtio-pmem (virtio-mem's block size is memvisor's default, 2M: a host page on every backend)."""
    balloon = "virtio-balloon,id=balloon0" + (",free-page-reporting=on" if reporting else "")
    balloon += ",free-page-hint=on" if hinting else ""
    argv = [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", "1G", *memvisor_args(backend),
            "--kernel", str(kernel), "--initrd", str(initrd), "--qmp", str(work / "mv-qmp.sock"),
            "--console", str(work / "mv-console.log"), "--device", balloon]  # fmt: skip
    if pmem is not None:
        argv += ["--device", "virtio-mem,id=vm0,max-size=2G", "--device", f"virtio-pmem,id=pm0,file={pmem}"]
    return argv


def memvisor_env(ioeventfd: bool, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """memvisor's environment: ours, with MEMVISOR_IOEVENTFD=1 (the eventfd fast path) or 0 (every queue notify
    an MMIO exit to Python), whatever ours says."""
    env = dict(os.environ if environ is None else environ)
    env[IOEVENTFD_ENV] = "1" if ioeventfd else "0"
    return env


class MemvisorVm(Vm):
    name = "memvisor"

    def __init__(self, work: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None,
                 hinting: bool = False, backend: str = "4k", ioeventfd: bool = False) -> None:  # fmt: skip
        self.name = "memvisor-ioeventfd" if ioeventfd else "memvisor"
        sock = work / "mv-qmp.sock"
        argv = memvisor_argv(work, kernel, initrd, reporting=reporting, pmem=pmem, hinting=hinting, backend=backend)
        self.process = subprocess.Popen(argv, cwd=REPO, env=memvisor_env(ioeventfd), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=(work / "mv-stderr.log").open("wb"))  # fmt: skip

        def start() -> None:
            self.qmp = _connect_qmp(sock, self.process, 240)
            self.check("true", 300)

        self._started(start)

    def exec(self, command: str, timeout: float = 300) -> tuple[int, str]:
        reply = self.cmd("x-guest-exec", command=command, timeout=timeout)
        output = base64.b64decode(reply["out-data"]) + base64.b64decode(reply["err-data"])
        return int(reply["exitcode"]), output.decode(errors="replace")

    def host_ram(self) -> int:
        """From outside the process, as for QEMU: blocks of its RAM memfds ("memvisor-ram0", ...); st_blocks counts
        hugetlbfs pages too (as memvisor's own x-query-host-memory reads them), so every backend reads alike."""
        return memfd_bytes(self.process.pid, lambda name: name.startswith("memvisor-ram"))

    def exits(self) -> dict[str, int] | None:
        reply = self.cmd("x-query-exits")
        return {item["kind"]: int(item["count"]) for item in reply["kinds"]}

    def pmem_flushes(self) -> int | None:
        counters = self.cmd("x-query-pmem")[0]["counters"]
        return int(counters["flush-requests"])


def qemu_machine(work: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None,
                 backend: str = "4k") -> QemuMachine:  # fmt: skip
    """QEMU's side of the benchmark's guest: the same memory on the same host pages (guest RAM's and virtio-mem's
    memfds both on `backend`: benchmarks/backends.py), the same devices on PCI."""
    devices = balloon_device(reporting=reporting)
    if pmem is not None:
        backend_options, device_options = qemu_virtio_mem_options(backend)
        devices += virtio_mem_device(2 * GiB, backend_options=backend_options, device_options=device_options)
        devices += pmem_device(pmem, PMEM_SIZE)
    return QemuMachine(kernel=kernel, initrd=initrd, cmdline=qemu_cmdline(), memory=GUEST_RAM, work=work,
                       maxmem=4 * GiB, devices=devices, ram_options=qemu_ram_options(backend))  # fmt: skip


class QemuVm(Vm):
    name = "qemu"

    def __init__(self, work: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None,
                 backend: str = "4k") -> None:  # fmt: skip
        machine = qemu_machine(work, kernel, initrd, reporting=reporting, pmem=pmem, backend=backend)
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
        """Blocks of its guest RAM memfd (hugetlbfs pages counted there too)."""
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

# The VMMs as measured, by their key in the results: (the table's column, whether queue notifies go through
# ioeventfds). QEMU's virtio-pci takes them through ioeventfds by default (ioeventfd=on); that is not switched here.
VARIANTS = {
    "memvisor": ("memvisor", False),
    "memvisor-ioeventfd": ("memvisor ioeventfd", True),
    "qemu": ("QEMU 7.2", True),
}
MEMVISOR_MODES = {"exit": "memvisor", "ioeventfd": "memvisor-ioeventfd"}  # --memvisor-modes: the variant of each


def variant_names(modes: str) -> list[str]:
    """The VMs of a run, from --memvisor-modes ("exit", "ioeventfd" or both, comma-separated): memvisor's, then
    QEMU's."""
    words = [word.strip() for word in modes.split(",") if word.strip()]
    if not words or set(words) - set(MEMVISOR_MODES) or len(set(words)) != len(words):
        sys.exit(f"--memvisor-modes {modes!r}: give exit, ioeventfd or both (each once), comma-separated")
    return [MEMVISOR_MODES[word] for word in words] + ["qemu"]


def vmm_info(name: str, backend: str) -> dict[str, Any]:
    """What the JSON records of one VMM variant: its backend and whether notifies go through ioeventfds."""
    return {"backend": backend, "ioeventfd": VARIANTS[name][1]}


def start_vm(name: str, folder: Path, kernel: Path, initrd: Path, *, reporting: bool, pmem: Path | None,
             backend: str) -> Vm:  # fmt: skip
    if name == "qemu":
        return QemuVm(folder, kernel, initrd, reporting=reporting, pmem=pmem, backend=backend)
    return MemvisorVm(folder, kernel, initrd, reporting=reporting, pmem=pmem, backend=backend,
                      ioeventfd=VARIANTS[name][1])  # fmt: skip


def rotation(vms: list[Vm], run: int) -> list[Vm]:
    """Who goes first rotates from run to run (with two VMs: they alternate), so that the load of the moment and
    any warm-up fall on all of them alike."""
    if not vms:
        return []
    first = run % len(vms)
    return vms[first:] + vms[:first]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every phase runs: the VMs (VARIANTS keys), on which host pages, how many rounds."""

    names: list[str]
    backend: str
    runs: int


def boot_all(work: Path, image: GuestImage, initrd: Path, plan: Plan, *, reporting: bool,
             results: dict[str, dict[str, list[Any]]]) -> list[Vm]:  # fmt: skip
    """Boot the plan's guests side by side (in parallel: the lab is slow), in the plan's order; a VMM that fails
    to boot is recorded in results[name]["failures"] and left out, the others go on."""
    vms: list[Vm | None] = [None] * len(plan.names)
    errors: list[BaseException] = []

    def boot(index: int, name: str) -> None:
        folder = work / f"{name}-{'fpr' if reporting else 'main'}"
        folder.mkdir()
        pmem = None
        if not reporting:
            pmem = folder / "pmem.img"
            with pmem.open("wb") as file:
                file.truncate(PMEM_SIZE)
        try:
            vms[index] = start_vm(name, folder, image.kernel, initrd, reporting=reporting, pmem=pmem,
                                  backend=plan.backend)  # fmt: skip
        except BaseException as err:  # reported below, after every thread is done
            errors.append(err)
            log(f"{name}: FAILED to boot: {err!r}")
            for console in sorted(folder.glob("*console*.log")):  # what the guest's kernel said last
                tail = console.read_text(errors="replace").splitlines()[-25:]
                log(f"{name}: the end of {console.name}:\n" + "\n".join(tail))
            results[name].setdefault("failures", []).append(f"boot ({'reporting' if reporting else 'main'}): {err}")

    threads = [threading.Thread(target=boot, args=(i, name)) for i, name in enumerate(plan.names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    booted = [vm for vm in vms if vm is not None]
    if errors and not booted:
        raise RuntimeError(f"no VMM booted: {errors[0]}")
    return booted


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, dict[str, list[Any]]], raw: dict[str, list[float]],
          vmms: dict[str, dict[str, Any]] | None = None) -> str:  # fmt: skip
    """The table of whatever was measured: a column per VMM variant in `results` (memvisor, memvisor with
    ioeventfd, QEMU), then each memvisor variant's ratio to QEMU; a row with no samples shows "-". `vmms` (the
    JSON's record of each variant) names the backend in the heading; without it: 4k."""
    names = [name for name in VARIANTS if name in results]
    memvisors = [name for name in names if name != "qemu"]
    qemu = results.get("qemu", {})
    labels = [VARIANTS[name][0] for name in names]
    backends = sorted({info["backend"] for info in (vmms or {}).values()}) or ["4k"]
    backend = backends[0] if len(backends) == 1 else "mixed (" + ", ".join(backends) + ")"

    def cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
        return f"{fmt.format(median(values) * scale)} (n={len(values)})" if values else "- (n=0)"

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{median(a) / median(b):.2f}" if a and b and median(b) else "-"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rows = []

    def row(what: str, key: str, fmt: str = "{:.2f}", scale: float = 1.0) -> None:
        values = {name: results[name].get(key, []) for name in names}
        rows.append(line([what, *(cell(values[name], fmt, scale) for name in names),
                          *(ratio(values[name], qemu.get(key, [])) for name in memvisors)]))  # fmt: skip

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

    def exits_per_gib(samples: list[dict[str, int] | None], size: int) -> str:
        totals = [sum(s.values()) for s in samples if s is not None]
        return f"{median(totals) * GiB / size:.0f}" if totals else "-"

    no_ratios = ["-"] * len(memvisors)
    rows.append(line(["discard calls in one inflate 1G -> 512M (strace)",
                      *(discards(results[name].get("discards", [])) for name in names), *no_ratios]))  # fmt: skip
    for what, key, size in (("inflated", "inflate_exits", GUEST_RAM - BALLOON_TARGET), ("plugged", "plug_exits", PLUG)):
        rows.append(line([f"exits to Python per GiB {what}",
                          *("-" if name == "qemu" else exits_per_gib(results[name].get(key, []), size) for name in names),
                          *no_ratios]))  # fmt: skip
    heading = [f"what (median, n = runs behind it; 1G guest, --memory-backend {backend}, 1 vCPU)", *labels,
               *(f"{VARIANTS[name][0]}/QEMU" for name in memvisors)]  # fmt: skip
    lines = [
        line(heading),
        "|---" * len(heading) + "|",
        *rows,
        "",
        line(["raw limit: fallocate(PUNCH_HOLE) over 512M of touched memfd (4 KiB pages, whatever the backend), "
              "Python+ctypes, between the VM runs", "s", *(f"{label} inflate / it" for label in labels)]),
        "|---" * (2 + len(names)) + "|",
    ]  # fmt: skip
    for key, what in (("4k", "one call per 4 KiB page"), ("1m", "one call per 1 MiB run")):
        limit = raw.get(key, [])
        lines.append(line([what, cell(limit, "{:.3f}"), *(ratio(results[name].get("inflate", []), limit)
                                                           for name in names)]))  # fmt: skip
    lines += [
        "",
        f"Guest RAM and virtio-mem on {backend} host pages for every VMM. Host memory (the reporting row) is the "
        "blocks of each VMM's guest RAM memfd through /proc/PID/fd, which count hugetlbfs pages too: comparable on "
        "every backend (on hugetlb, memory given back goes to the host's pool of huge pages).",
    ]
    if "memvisor-ioeventfd" in names:
        lines.append("memvisor ioeventfd: MEMVISOR_IOEVENTFD=1 (queue notifies through KVM ioeventfds, interrupts "
                     "through irqfds); memvisor: every notify an MMIO exit to Python. QEMU's virtio-pci uses ioeventfds "
                     "by default.")  # fmt: skip
    for name in names:
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
    parser.add_argument("--memory-backend", choices=BACKENDS, default="4k",
                        help="host pages behind guest RAM and virtio-mem, for every VMM: 4k (default), thp or hugetlb "
                        "(sets the host's shmem THP and hugetlbfs pool for the run and puts them back: needs root, as "
                        "in the lab)")  # fmt: skip
    parser.add_argument("--memvisor-modes", default="exit",
                        help="memvisor's VMs beside QEMU's, comma-separated: exit (every queue notify an MMIO exit to "
                        "Python; the default) and/or ioeventfd (MEMVISOR_IOEVENTFD=1); exit,ioeventfd boots three VMs "
                        "measured in one rotation against the same QEMU runs")  # fmt: skip
    parser.add_argument("--ioeventfd", action="store_true", help="short for --memvisor-modes ioeventfd")
    parser.add_argument("--poll", type=float, default=POLL, help="seconds between QMP polls while waiting")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: merge these --json files and print the table")
    parser.add_argument("--logs", type=Path, help="copy the VMs' console and stderr logs into this folder at the end")
    args = parser.parse_args()
    if args.table:
        return print_merged(args.table)
    if args.ioeventfd and args.memvisor_modes != "exit":
        sys.exit("give --ioeventfd or --memvisor-modes, not both")
    plan = Plan(variant_names("ioeventfd" if args.ioeventfd else args.memvisor_modes), args.memory_backend, args.runs)
    image = find_guest_image("default")
    if image is None:
        sys.exit("no guest image: run `memvisor image build` on the host first")
    phases = set(args.phases.split(","))
    POLL = args.poll
    results: dict[str, dict[str, list[Any]]] = {name: {key: [] for key in KEYS} for name in plan.names}
    raw: dict[str, list[float]] = {"4k": [], "1m": []}
    vmms = {name: vmm_info(name, plan.backend) for name in plan.names}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"runs": args.runs, "backend": plan.backend, "vmms": vmms,
                                             "results": results, "raw": raw}, indent=1))  # fmt: skip

    status = 0
    # On hugetlbfs every guest's RAM is reserved at boot, and one VM at a time plugs 1G into virtio-mem.
    with host_pages(plan.backend, len(plan.names) * GUEST_RAM + PLUG):
        try:
            with tempfile.TemporaryDirectory(prefix="membench-") as tmp, _keep_logs(Path(tmp), args.logs):
                work = Path(tmp)
                initrd = initrd_with_virtio_pci(image, work / "initrd.img")
                for phase, run in (("main", run_main), ("balloon", run_balloon), ("reporting", run_reporting)):
                    if phase not in phases:
                        continue
                    try:
                        run(work, image, initrd, plan, results, raw, save)
                    except Exception as err:  # a phase that fails leaves the others and the partial table
                        log(f"phase {phase} FAILED: {err}")
                        for name in results:
                            results[name].setdefault("failures", []).append(f"phase {phase}: {err}")
                        status = 1
        finally:
            save()
            print(table(results, raw, vmms))
    return status


Results = dict[str, dict[str, list[Any]]]


def _failed(vm: Vm, what: str, err: BaseException, results: Results, vms: list[Vm]) -> None:
    """A VM that fails is shut down at once (before the others go on) and takes no more runs."""
    log(f"{what} {vm.name}: FAILED, shutting it down, no more runs for it: {err}")
    results[vm.name].setdefault("failures", []).append(f"{what}: {err}")
    vm.close()
    vms.remove(vm)


def run_main(work: Path, image: GuestImage, initrd: Path, plan: Plan, results: Results,
             raw: dict[str, list[float]], save: Callable[[], None]) -> None:  # fmt: skip
    log(f"booting {', '.join(plan.names)} (balloon, virtio-mem, virtio-pmem; {plan.backend} pages)")
    booted = time.monotonic()
    vms = boot_all(work, image, initrd, plan, reporting=False, results=results)
    log(f"{[vm.name for vm in vms]} up after {time.monotonic() - booted:.0f} s")
    try:
        for vm in list(vms):
            try:
                setup_pmem(vm)
            except Exception as err:
                _failed(vm, "pmem set-up", err, results, vms)
        for run in range(plan.runs):
            for vm in rotation(vms, run):
                try:
                    sample: dict[str, Any] = {}
                    for step in (measure_balloon, measure_mem, measure_pmem):
                        up = guest_uptime(vm)
                        sample.update(step(vm))
                        if guest_uptime(vm) < up:
                            raise RuntimeError(f"the guest rebooted during {step.__name__}")
                except Exception as err:  # one VMM failing must not lose the others' numbers
                    _failed(vm, f"run {run + 1}", err, results, vms)
                    continue
                for key, value in sample.items():
                    results[vm.name][key].append(value)
                log(f"run {run + 1} {vm.name:18s} inflate {sample['inflate']:6.2f} s deflate {sample['deflate']:6.2f}"
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


def run_balloon(work: Path, image: GuestImage, initrd: Path, plan: Plan, results: Results,
                raw: dict[str, list[float]], save: Callable[[], None]) -> None:  # fmt: skip
    """The balloon alone, polling every 0.05 s and every 0.5 s in turn: each QMP poll is Python work inside
    memvisor's process (the GIL its vCPU thread needs), while QEMU answers QMP in C off its vCPU thread."""
    global POLL
    log(f"booting {', '.join(plan.names)} (balloon only)")
    vms = boot_all(work, image, initrd, plan, reporting=False, results=results)
    try:
        for run in range(plan.runs):
            for vm in rotation(vms, run):
                try:
                    for POLL in (0.05, 0.5):
                        sample = measure_balloon(vm)
                        for key in ("inflate", "deflate"):
                            results[vm.name].setdefault(f"{key}@{POLL}", []).append(sample[key])
                        log(f"run {run + 1} {vm.name:18s} poll {POLL} s: inflate {sample['inflate']:6.2f} s "
                            f"deflate {sample['deflate']:6.2f} s")
                        save()
                except Exception as err:
                    _failed(vm, f"balloon run {run + 1}", err, results, vms)
    finally:
        for vm in vms:
            vm.close()


def run_reporting(work: Path, image: GuestImage, initrd: Path, plan: Plan, results: Results,
                  raw: dict[str, list[float]], save: Callable[[], None]) -> None:  # fmt: skip
    log(f"booting {', '.join(plan.names)} (balloon with free page reporting)")
    vms = boot_all(work, image, initrd, plan, reporting=True, results=results)
    try:
        for run in range(plan.runs):
            for vm in rotation(vms, run):
                try:
                    sample = measure_reporting(vm)
                except Exception as err:
                    _failed(vm, f"reporting run {run + 1}", err, results, vms)
                    continue
                results[vm.name]["reporting"].append(sample["reporting"])
                log(f"run {run + 1} {vm.name:18s} reporting {sample['reporting']:6.2f} s")
                save()
    finally:
        for vm in vms:
            vm.close()


def recorded_vmms(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each VMM variant's backend and ioeventfd as a --json file records them; a file written before they were
    recorded ran everything on 4k pages, memvisor without ioeventfd."""
    if "vmms" in data:
        return {name: dict(info) for name, info in data["vmms"].items()}
    return {name: vmm_info(name, data.get("backend", "4k")) for name in data["results"]}


def merge(files: list[tuple[str, dict[str, Any]]]) -> tuple[Results, dict[str, list[float]], dict[str, dict[str, Any]]]:
    """The result lists of several --json files (e.g. a main and a reporting run), joined per VMM variant; files
    that ran one variant differently (another backend) are refused: their numbers do not belong in one column."""
    results: Results = {}
    raw: dict[str, list[float]] = {}
    vmms: dict[str, dict[str, Any]] = {}
    seen_in: dict[str, str] = {}
    for where, data in files:
        for name, info in recorded_vmms(data).items():
            if name not in VARIANTS:
                sys.exit(f"{where}: unknown VMM variant {name!r} (known: {', '.join(VARIANTS)})")
            if name in vmms and vmms[name] != info:
                sys.exit(f"{where}: {name} ran with {info}, but in {seen_in[name]} with {vmms[name]}: "
                         "give --table files of one --memory-backend")  # fmt: skip
            vmms.setdefault(name, info)
            seen_in.setdefault(name, where)
        for name, lists in data["results"].items():
            for key, values in lists.items():
                results.setdefault(name, {}).setdefault(key, []).extend(values)
        for key, values in data.get("raw", {}).items():
            raw.setdefault(key, []).extend(values)
    for name in results:
        for key in KEYS:
            results[name].setdefault(key, [])
    return results, raw, vmms


def print_merged(paths: list[Path]) -> int:
    """Merge several --json files and print the table."""
    files = []
    for path in paths:
        try:
            files.append((str(path), json.loads(path.read_text())))
        except (OSError, ValueError) as err:
            sys.exit(f"--table {path}: {err}")
    print(table(*merge(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
