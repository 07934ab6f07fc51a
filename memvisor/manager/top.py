"""`memvisor top`: one screen of VMs' memory, read through their QMP sockets (memvisor's and QEMU's alike).

    memvisor top /tmp/vm1.sock /tmp/vm2.sock          refresh every 2 s until Ctrl-C
    memvisor top --once '/run/vms/*.sock'             print once and exit (1 if a VM could not be read)
    memvisor top --poll 2 /tmp/vm1.sock               first turn the guests' stats polling on (every 2 s)

Per VM: the balloon's actual size, the guest's available and free memory from its balloon statistics (with their
age), what the host holds for it (memvisor's x-query-host-memory, else its cgroup's memory.current when it sits
alone in one, else the process's RSS), and virtio-mem's size and requested size. Read-only unless --poll is
given: top never moves a balloon. A VM that cannot be read shows its error in its row and is tried again at
the next refresh.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memvisor.control.client import QmpConnection
from memvisor.errors import MemvisorError, UsageError
from memvisor.manager.vm import Sample, VmLink, vm_name

CLEAR = "\x1b[H\x1b[2J"


@dataclass
class Row:
    name: str
    kind: str = "-"
    sample: Sample | None = None
    host_source: str = "-"
    polling: int | None = None
    error: str | None = None


class TopLink(VmLink):
    """A VmLink that only reads: no guest agent command, stats polling left as the VM has it."""

    def __init__(self, path: str, qmp: QmpConnection) -> None:
        super().__init__(path, qmp)
        self.psi_skip = -1  # top runs no command in the guest

    def _host_bytes(self) -> int | None:
        if self.has_host_memory:  # memvisor's own count first: what its guest memory holds
            return int(self.qmp.execute("x-query-host-memory")["total"])
        return super()._host_bytes()

    @property
    def host_source(self) -> str:
        if self.has_host_memory:
            return "x-query-host-memory"
        return "cgroup" if self.cgroup is not None else "RSS"

    def polling(self) -> int | None:
        value = self.qmp.execute("qom-get", {"path": self.balloon_path, "property": "guest-stats-polling-interval"})
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def sockets(patterns: Sequence[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found += [path for path in matches if path not in found]
    return found


class Top:
    """Keeps one connection per socket between refreshes; `read()` gives a Row per socket."""

    def __init__(self, patterns: Sequence[str], *, poll: int | None = None, timeout: float = 5.0) -> None:
        self.patterns = list(patterns)
        self.poll = poll
        self.timeout = timeout
        self.links: dict[str, TopLink] = {}

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()

    def _link(self, path: str) -> TopLink:
        link = self.links.get(path)
        if link is None:
            qmp = QmpConnection(path, timeout=self.timeout)
            try:
                link = TopLink(path, qmp)
                if self.poll is not None:
                    link.set_polling(self.poll)
            except BaseException:
                qmp.close()
                raise
            self.links[path] = link
        return link

    def read(self) -> list[Row]:
        paths = sockets(self.patterns)
        for gone in set(self.links) - set(paths):
            self.links.pop(gone).close()
        rows = []
        for path in paths:
            row = Row(vm_name(path))
            try:
                link = self._link(path)
                row.kind, row.host_source = link.kind, link.host_source
                row.sample, row.polling = link.sample(), link.polling()
            except (MemvisorError, KeyError, TypeError, ValueError) as err:  # a VM away or a malformed reply
                row.error = str(err) if isinstance(err, MemvisorError) else f"unexpected reply ({err!r})"
                dropped = self.links.pop(path, None)
                if dropped is not None:
                    dropped.close()
            rows.append(row)
        return rows


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value >> 20}M"


def render(rows: Sequence[Row], now: float) -> str:
    """The screen: a header, then one line per VM (its error in place of its numbers when it cannot be read)."""
    header = ("VM", "KIND", "ACTUAL", "BOOT", "AVAILABLE", "FREE", "STATS", "HOST", "(FROM)", "VIRTIO-MEM")
    table: list[tuple[str, ...]] = [header]
    errors: dict[int, str] = {}
    for row in rows:
        sample = row.sample
        if row.error is not None or sample is None:
            errors[len(table)] = f"{row.name}  {row.error or 'no data'}"
            table.append(())
            continue
        stats = sample.stats
        if sample.stats_time is None:
            age = "never" if row.polling else "off"
        else:
            age = f"{max(0, now - sample.stats_time):.0f}s ago"
        vmem = f"{_mib(sample.vmem.size)}/{_mib(sample.vmem.requested)}" if sample.vmem else "-"
        table.append((row.name, row.kind, _mib(sample.actual), _mib(sample.boot_ram),
                      _mib(stats.available if stats else None), _mib(stats.free if stats else None), age,
                      _mib(sample.host_bytes), row.host_source, vmem))  # fmt: skip
    widths = [max(len(cells[i]) for cells in table if cells) for i in range(len(header))]
    held = sum(row.sample.host_bytes or 0 for row in rows if row.sample is not None)
    lines = [f"memvisor top  {time.strftime('%H:%M:%S', time.localtime(now))}  {len(rows)} VMs, host holds "
             f"{held >> 20}M for them  (virtio-mem: size/requested)"]  # fmt: skip
    for index, cells in enumerate(table):
        lines.append(errors[index] if index in errors else "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if any(row.sample is not None and row.sample.stats_time is None and not row.polling for row in rows):
        lines.append("stats polling is off for some VMs: `memvisor top --poll 2 ...` turns it on")
    return "\n".join(lines)


def run_top(args: argparse.Namespace, *, out: Any = None, sleep: Callable[[float], None] = time.sleep) -> int:
    out = out or sys.stdout
    if args.interval <= 0:
        raise UsageError(f"--interval must be above 0 seconds, got {args.interval:g}")
    if args.poll is not None and not 1 <= args.poll <= 3600:
        raise UsageError(f"--poll must be between 1 and 3600 seconds, got {args.poll}")
    if not sockets(args.sockets) and all(not glob.has_magic(p) for p in args.sockets):
        raise UsageError("no socket given: name the VMs' QMP sockets, e.g. memvisor top /tmp/vm1.sock")
    top = Top(args.sockets, poll=args.poll)
    clear = CLEAR if not args.once and out.isatty() else ""
    try:
        while True:
            rows = top.read()
            out.write(clear + render(rows, time.time()) + "\n" + ("" if clear or args.once else "\n"))
            out.flush()
            if args.once:
                return 1 if any(row.error for row in rows) else 0
            sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        top.close()


def add_top_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "top", help="one screen of VMs' memory: balloon, guest available/free, host held, virtio-mem",
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memvisor top /tmp/vm1.sock /tmp/vm2.sock\n  memvisor top --once '/run/vms/*.sock'\n"
               "  memvisor top --poll 2 /tmp/vm1.sock",
    )  # fmt: skip
    parser.add_argument("sockets", metavar="SOCK", nargs="+", help="a VM's QMP socket, or a quoted glob")
    parser.add_argument("--once", action="store_true", help="print one screen and exit (1 if a VM could not be read)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (2)")
    parser.add_argument("--poll", type=int, metavar="S", help="first set each balloon's stats polling to S seconds")
    parser.set_defaults(func=run_top)

