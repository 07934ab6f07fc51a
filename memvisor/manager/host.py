"""What the host says about memory: MemAvailable, memory PSI (and a PSI trigger to wake on), swap, a VM's share.

    host = HostInputs()
    host.mem_available()        # /proc/meminfo MemAvailable in bytes
    host.psi_some_avg10()       # /proc/pressure/memory "some avg10", percent
    host.swap_out_bytes()       # /proc/vmstat pswpout in bytes (cumulative)
    trigger = PsiTrigger.open() # poll its fd for POLLPRI: the kernel signals when stall time crosses a threshold
    process_memory(pid, cgroup) # a VM's host memory: its cgroup v2 memory.current, else the process's RSS

Sources: Documentation/accounting/psi.rst (trigger format "some|full STALL_US WINDOW_US", POLLPRI; unprivileged
users need a window that is a multiple of 2 s), Documentation/admin-guide/cgroup-v2.rst (memory.current,
cgroup.procs, /proc/PID/cgroup "0::PATH"), proc(5).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes by field name."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[name.strip()] = int(words[0]) * (1024 if len(words) > 1 and words[1] == "kB" else 1)
    return values


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """/proc/pressure/memory (or a cgroup's memory.pressure, or a guest's): {"some": {"avg10": ...}, "full": ...}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("some", "full"):
            continue
        fields: dict[str, float] = {}
        for word in words[1:]:
            key, _, value = word.partition("=")
            try:
                fields[key] = float(value)
            except ValueError:
                continue
        out[words[0]] = fields
    return out


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A "KEY VALUE" per line file: /proc/vmstat, a cgroup's memory.events or memory.stat."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit():
            values[words[0]] = int(words[1])
    return values


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass
class HostInputs:
    proc: Path = Path("/proc")

    def mem_available(self) -> int | None:
        text = _read(self.proc / "meminfo")
        return parse_meminfo(text).get("MemAvailable") if text else None

    def psi_some_avg10(self) -> float | None:
        text = _read(self.proc / "pressure" / "memory")
        return parse_psi(text).get("some", {}).get("avg10") if text else None

    def swap_out_bytes(self) -> int | None:
        text = _read(self.proc / "vmstat")
        return parse_flat_keyed(text).get("pswpout", 0) * PAGE_SIZE if text else None


class PsiTrigger:
    """A memory PSI trigger: `fileno()` becomes readable-with-POLLPRI when stalls exceed the threshold."""

    def __init__(self, fd: int, spec: str) -> None:
        self.fd = fd
        self.spec = spec

    @classmethod
    def open(cls, path: str = "/proc/pressure/memory", stall_us: int = 150_000) -> PsiTrigger | None:
        """A trigger for `stall_us` of "some" stall per window (1 s, else 2 s unprivileged); None if refused."""
        for window in (1_000_000, 2_000_000):
            spec = f"some {stall_us * window // 1_000_000} {window}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as err:
                log.info("no PSI trigger (%s: %s): polling every interval only", path, err.strerror)
                return None
            try:
                os.write(fd, spec.encode() + b"\0")
                return cls(fd, spec)
            except OSError as err:
                os.close(fd)
                last = err.strerror
        log.info("PSI trigger refused (%s): polling every interval only", last)
        return None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


def wait(trigger: PsiTrigger | None, wake_fd: int | None, timeout: float) -> str:
    """Sleep up to `timeout` s; return "psi" when the trigger fired, "wake" for the wake pipe, else "timeout"."""
    poller = select.poll()
    if trigger is not None:
        poller.register(trigger.fileno(), select.POLLPRI)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    for fd, mask in poller.poll(max(0.0, timeout) * 1000):
        if trigger is not None and fd == trigger.fileno() and mask & (select.POLLPRI | select.POLLERR):
            return "psi"
        if fd == wake_fd:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_fd, 4096)
            return "wake"
    return "timeout"


def cgroup_of(pid: int, proc: Path = Path("/proc")) -> Path | None:
    """The process's cgroup v2 directory if it sits alone in it (as libvirt's machine.slice arranges), else None."""
    text = _read(proc / str(pid) / "cgroup")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            path = CGROUP_ROOT / line[3:].strip().lstrip("/")
            procs = _read(path / "cgroup.procs")
            if procs is not None and procs.split() == [str(pid)] and (path / "memory.current").exists():
                return path
    return None


def cgroup_memory(path: str | Path) -> int | None:
    text = _read(Path(path) / "memory.current")
    return int(text) if text and text.strip().isdigit() else None


def process_rss(pid: int, proc: Path = Path("/proc")) -> int | None:
    """What process `pid` holds: VmRSS plus its hugetlbfs pages (HugetlbPages), which VmRSS leaves out."""
    text = _read(proc / str(pid) / "status")
    if not text:
        return None
    fields = parse_meminfo(text)
    rss = fields.get("VmRSS")
    return None if rss is None else rss + fields.get("HugetlbPages", 0)
