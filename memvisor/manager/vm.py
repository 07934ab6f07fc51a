"""One supervised VM seen through its QMP socket: what it can do, what it reports, and the two actuators.

    link = VmLink.connect("/run/vm1.sock", interval=5)   # probes features, turns stats polling on
    sample = link.sample()                                # actual, guest stats, virtio-mem, host memory, PSI
    link.set_balloon(768 << 20)                           # QMP `balloon`
    link.set_requested_size("vm0", 1 << 30)               # virtio-mem `qom-set requested-size`

Works with memvisor and QEMU 7.2 alike; features are detected, never assumed from the greeting:
- host memory: cgroup v2 memory.current when the VM sits alone in a cgroup (config `cgroup`, else found from
  the server's pid, SO_PEERCRED on the socket), else memvisor's `x-query-host-memory`, else the process's RSS;
- guest memory PSI: memvisor's guest agent (`x-guest-exec cat /proc/pressure/memory`); QEMU has no channel;
- guest statistics: the balloon's `guest-stats` QOM property (virtio 1.2 section 5.5.6.3), 2**64 - 1 meaning
  "not reported"; the manager sets `guest-stats-polling-interval` to its own interval.
"""

from __future__ import annotations

import base64
import logging
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor.control.client import QmpConnection
from memvisor.errors import MemvisorError
from memvisor.manager import host
from memvisor.manager.host import parse_psi
from memvisor.manager.policy import GuestStats, VirtioMem

log = logging.getLogger(__name__)

NOT_REPORTED = (1 << 64) - 1
PSI_TIMEOUT = 3.0
PSI_RETRY_ROUNDS = 6  # after the agent failed to answer (busy with a long command), ask again this many rounds later


def vm_name(path: str) -> str:
    """A VM's name: its socket's file name without `.sock`/`.qmp`."""
    name = Path(path).name
    for suffix in (".sock", ".qmp"):
        name = name.removesuffix(suffix)
    return name or path


def stat_value(stats: dict[str, Any], name: str) -> int | None:
    value = stats.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= NOT_REPORTED:
        return None
    return value


@dataclass(frozen=True)
class Sample:
    """One interval's view of a VM."""

    actual: int
    boot_ram: int
    stats: GuestStats | None
    stats_time: float | None  # the guest's last-update (seconds since the epoch), None if never
    major_faults: int | None
    swap_in: int | None  # bytes
    vmem: VirtioMem | None
    host_bytes: int | None
    guest_psi: float | None


class VmLink:
    def __init__(self, path: str, qmp: QmpConnection, *, cgroup: str | None = None) -> None:
        self.path = path
        self.name = vm_name(path)
        self.qmp = qmp
        commands = {c["name"] for c in qmp.execute("query-commands")}
        self.has_host_memory = "x-query-host-memory" in commands
        self.has_agent = "x-guest-exec" in commands
        self.kind = "memvisor" if self.has_host_memory else "qemu"
        self.balloon_path = self._find_balloon()
        self.boot_ram = int(qmp.execute("query-memory-size-summary")["base-memory"])
        self.pid = _peer_pid(qmp)
        self.cgroup: Path | None = Path(cgroup) if cgroup else (host.cgroup_of(self.pid) if self.pid else None)
        self.psi_skip = 0 if self.has_agent else -1  # rounds to skip guest PSI; -1: never (no agent or no PSI)

    @classmethod
    def connect(cls, path: str, interval: float, *, cgroup: str | None = None, timeout: float = 10.0) -> VmLink:
        qmp = QmpConnection(path, timeout=timeout)
        try:
            link = cls(path, qmp, cgroup=cgroup)
            link.set_polling(interval)
        except BaseException:
            qmp.close()
            raise
        return link

    def close(self) -> None:
        self.qmp.close()

    def _find_balloon(self) -> str:
        for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
            try:
                children = self.qmp.execute("qom-list", {"path": parent})
            except MemvisorError:
                continue
            for prop in children:
                if str(prop.get("type", "")).startswith("child<virtio-balloon"):
                    return f"{parent}/{prop['name']}"
        raise MemvisorError(
            f"{self.path}: the VM has no balloon; start it with --device virtio-balloon,id=balloon0 "
            "(QEMU: -device virtio-balloon-pci,id=balloon0)"
        )

    def set_polling(self, interval: float) -> bool:
        """Set the balloon's stats polling to the manager's interval; True if it had to be changed."""
        seconds = max(1, int(round(interval)))
        current = self.qmp.execute("qom-get", {"path": self.balloon_path, "property": "guest-stats-polling-interval"})
        if current != seconds:
            self.qmp.execute("qom-set", {"path": self.balloon_path, "property": "guest-stats-polling-interval",
                                         "value": seconds})  # fmt: skip
            return True
        return False

    # --- inputs ------------------------------------------------------------------------------------------------

    def sample(self) -> Sample:
        actual = int(self.qmp.execute("query-balloon")["actual"])
        raw = self.qmp.execute("qom-get", {"path": self.balloon_path, "property": "guest-stats"})
        stats, stats_time, faults, swap_in = _guest_stats(raw)
        return Sample(actual, self.boot_ram, stats, stats_time, faults, swap_in, self._vmem(), self._host_bytes(),
                      self._guest_psi())  # fmt: skip

    def _vmem(self) -> VirtioMem | None:
        for dev in self.qmp.execute("query-memory-devices"):
            if dev.get("type") == "virtio-mem":
                data = dev["data"]
                return VirtioMem(str(data["id"]), int(data["size"]), int(data["requested-size"]),
                                 int(data["max-size"]), int(data["block-size"]))  # fmt: skip
        return None  # one virtio-mem device per VM is managed (the first)

    def _host_bytes(self) -> int | None:
        if self.cgroup is not None:
            held = host.cgroup_memory(self.cgroup)
            if held is not None:
                return held
        if self.has_host_memory:
            return int(self.qmp.execute("x-query-host-memory")["total"])
        return host.process_rss(self.pid) if self.pid else None

    def _guest_psi(self) -> float | None:
        if self.psi_skip < 0:
            return None
        if self.psi_skip > 0:
            self.psi_skip -= 1
            return None
        try:
            reply = self.qmp.execute("x-guest-exec", {"command": "cat /proc/pressure/memory", "timeout": PSI_TIMEOUT})
        except MemvisorError as err:
            log.info("%s: no guest PSI this time (%s); asking again in %d rounds", self.name, err, PSI_RETRY_ROUNDS)
            self.psi_skip = PSI_RETRY_ROUNDS
            return None
        if reply.get("exitcode") != 0:
            log.info("%s: the guest kernel has no memory PSI; going on without it", self.name)
            self.psi_skip = -1
            return None
        text = base64.b64decode(reply.get("out-data", "")).decode(errors="replace")
        return parse_psi(text).get("some", {}).get("avg10")

    # --- actuators ---------------------------------------------------------------------------------------------

    def set_balloon(self, target: int) -> None:
        self.qmp.execute("balloon", {"value": int(target)})

    def set_requested_size(self, device: str, size: int) -> None:
        self.qmp.execute("qom-set", {"path": device, "property": "requested-size", "value": int(size)})


def _guest_stats(raw: Any) -> tuple[GuestStats | None, float | None, int | None, int | None]:
    if not isinstance(raw, dict):
        return None, None, None, None
    stats = raw.get("stats", {}) if isinstance(raw.get("stats"), dict) else {}
    last = raw.get("last-update")
    when = float(last) if isinstance(last, int | float) and last > 0 else None
    total, available = stat_value(stats, "stat-total-memory"), stat_value(stats, "stat-available-memory")
    guest = None
    if when is not None and total is not None and available is not None:
        guest = GuestStats(total, min(available, total), stat_value(stats, "stat-free-memory"),
                           stat_value(stats, "stat-disk-caches"))  # fmt: skip
    return guest, when, stat_value(stats, "stat-major-faults"), stat_value(stats, "stat-swap-in")


def _peer_pid(qmp: QmpConnection) -> int | None:
    """The pid of the process serving the socket (SO_PEERCRED), None where the kernel will not say."""
    sock = getattr(qmp, "_sock", None)
    if not isinstance(sock, socket.socket):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


def now() -> float:
    return time.time()
