"""What the control plane needs from a running VM: the `MachineControl` protocol.

The QMP server (memvisor/control/server.py) talks to the machine only through these typed calls, so that it can
be tested against a fake (memvisor/control/fake.py) and wired to the real VMM with little glue. Every call may be
made from a worker thread of the server; calls that take time (guest exec, stop) may block.

Sizes are integers of bytes. A machine refuses a request by raising `MachineError` (its message becomes the
QMP error's `desc`, so write it as QEMU would: one line, no trailing period).

Events flow the other way: the server hands the machine an `EventSink` with `set_event_sink`, and the machine
calls it from any thread with a QEMU event name and its `data` (see memvisor/control/events.py for builders of
each event's exact shape): BALLOON_CHANGE, MEMORY_DEVICE_SIZE_CHANGE, STOP, RESUME, SHUTDOWN.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from memvisor.errors import MemvisorError

EventData = dict[str, Any] | None
EventSink = Callable[[str, EventData], None]
"""`emit(event_name, data)`: called by the machine, from any thread, never blocks for long."""


class MachineError(MemvisorError):
    """The machine refused or failed a control request; `error_class` is the QMP error class to report.

    Any other MemvisorError out of a device (a UsageError for a bad value, a HostFailure) reaches QMP as it is:
    the server maps every MemvisorError once, at its boundary, to GenericError with its message."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


class RunState(enum.StrEnum):
    """QEMU's RunState names for the states memvisor can be in (QAPI `RunState`)."""

    PRELAUNCH = "prelaunch"  # created, vCPUs never started
    RUNNING = "running"
    PAUSED = "paused"  # stopped by `stop`
    POSTMIGRATE = "postmigrate"  # paused after a completed live migration (the destination runs the guest)
    SHUTDOWN = "shutdown"  # the guest powered off (or `quit` is under way)
    INTERNAL_ERROR = "internal-error"  # a vCPU hit an error memvisor cannot continue from
    GUEST_PANICKED = "guest-panicked"


@dataclass(frozen=True)
class VcpuInfo:
    """One vCPU as `query-cpus-fast` shows it (QAPI `CpuInfoFast`)."""

    cpu_index: int
    thread_id: int  # host thread id (gettid) of the vCPU thread
    qom_path: str = ""  # default: /machine/unattached/device[cpu_index]
    props: Mapping[str, int] = field(default_factory=dict)  # socket-id, core-id, thread-id, node-id
    target: str = "x86_64"


@dataclass(frozen=True)
class VirtioMemInfo:
    """A virtio-mem device (QAPI `VirtioMEMDeviceInfo`). `size` is what the guest has plugged."""

    id: str
    memaddr: int  # guest physical base of the device region
    node: int  # NUMA node (ACPI proximity domain)
    requested_size: int
    size: int
    max_size: int  # the region size
    block_size: int


@dataclass(frozen=True)
class VirtioPmemInfo:
    """A virtio-pmem device (QAPI `VirtioPMEMDeviceInfo`)."""

    id: str
    memaddr: int
    size: int
    counters: Mapping[str, int] = field(default_factory=dict, compare=False)  # live: flush_requests, ...


MemoryDeviceInfo = VirtioMemInfo | VirtioPmemInfo


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command run in the guest by its agent."""

    exitcode: int
    stdout: bytes
    stderr: bytes


class HintState(enum.StrEnum):
    """The balloon's free page hinting cycle (virtio 1.2 section 5.5.6.8 free page hint cmd_id values)."""

    IDLE = "idle"  # never started
    REQUESTED = "requested"  # a cmd_id was offered, the driver has not answered yet
    RUNNING = "running"  # the driver is reporting free pages for the current cmd_id
    STOPPED = "stopped"  # the host asked the driver to stop (VIRTIO_BALLOON_CMD_ID_STOP)
    DONE = "done"  # the driver finished (VIRTIO_BALLOON_CMD_ID_DONE)


@dataclass(frozen=True)
class HintStatus:
    """One free page hinting cycle: the command id offered, its state and what the guest hinted so far."""

    cmd_id: int
    state: HintState
    pages: int  # 4 KiB pages hinted in this cycle
    bytes: int


GUEST_STAT_NAMES: tuple[str, ...] = (
    # virtio 1.2 section 5.5.6.3, VIRTIO_BALLOON_S_* tag order 0-9 (the ones QEMU 7.2 reports)
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
)
STAT_NOT_REPORTED = (1 << 64) - 1  # QEMU's value for a statistic the guest never sent


def guest_stats_dict(values: Mapping[int, int], last_update: int) -> dict[str, Any]:
    """Build QEMU's `guest-stats` property value from stats by virtio tag ({"stats": {...}, "last-update"}).

    Tags the guest never sent are STAT_NOT_REPORTED, as in QEMU; tags above 9 are ignored (QEMU 7.2 has none).
    `last_update` is the host time (seconds since the epoch) of the last stats buffer, 0 if none yet.
    """
    stats = {name: values.get(tag, STAT_NOT_REPORTED) for tag, name in enumerate(GUEST_STAT_NAMES)}
    return {"stats": stats, "last-update": last_update}


class BalloonControl(Protocol):
    """The virtio-balloon as the control plane drives it."""

    id: str  # the device id given on the command line (QEMU's -device ...,id=), e.g. "balloon0"

    def set_target_bytes(self, target: int) -> None:
        """Ask the guest to shrink or grow to `target` bytes of RAM (0 < target <= boot RAM, checked by caller)."""

    def actual_bytes(self) -> int:
        """Guest RAM minus what the balloon holds now (QEMU `query-balloon` `actual`)."""

    def guest_stats(self) -> dict[str, Any]:
        """The latest statistics in QEMU's `guest-stats` shape; build it with `guest_stats_dict`."""

    def stats_polling_interval(self) -> int:
        """Seconds between stats requests to the guest, 0 if polling is off."""

    def set_stats_polling_interval(self, seconds: int) -> None:
        """Set the polling interval (0 turns it off); the caller has checked 0 <= seconds <= 2**32 - 1."""

    def hint_start(self) -> HintStatus:
        """Start a free page hinting cycle with a new command id; MachineError if the feature is off."""

    def hint_stop(self) -> HintStatus:
        """Ask the guest to stop the current hinting cycle."""

    def hint_status(self) -> list[HintStatus]:
        """The current and recent hinting cycles, newest last."""

    def hinted_ranges(self) -> list[tuple[int, int]]:
        """The pages still hinted in the latest cycle as (guest physical address, length) ranges, after
        dropping those the guest wrote since (what migration may skip)."""


class MachineControl(Protocol):
    """Everything the QMP layer needs from a running VM. Implemented by the VMM; `FakeMachine` in tests."""

    def run_state(self) -> RunState:
        """Where the VM is now."""

    def stop(self) -> None:
        """Pause all vCPUs (no-op when paused); emits STOP when the state changes. May block until paused."""

    def cont(self) -> None:
        """Resume the vCPUs; emits RESUME. MachineError if the VM cannot run (shut down, internal error)."""

    def powerdown(self) -> None:
        """Press the ACPI power button: the guest decides whether and when to power off."""

    def reset(self) -> None:
        """Reset the machine (the guest reboots)."""

    def quit(self) -> None:
        """Shut the VM down now and make the VMM exit; emits SHUTDOWN (guest false, reason host-qmp-quit)."""

    def vcpus(self) -> list[VcpuInfo]:
        """Every vCPU, ordered by cpu_index."""

    def boot_memory_bytes(self) -> int:
        """Boot RAM (QEMU `-m`), not counting memory devices."""

    def balloon(self) -> BalloonControl | None:
        """The balloon device, None if the VM has none."""

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        """Every virtio-mem and virtio-pmem device, in creation order."""

    def set_requested_size(self, device_id: str, size: int) -> None:
        """Ask virtio-mem `device_id` to plug/unplug to `size` (validated by caller: aligned, <= max_size)."""

    def guest_exec(self, command: str, timeout: float) -> ExecResult:
        """Run a shell command in the guest through its agent; blocks up to `timeout` seconds.

        MachineError when there is no agent or the command does not finish in time.
        """

    def host_memory(self) -> dict[str, int]:
        """Bytes the host really holds for each region ("ram", then each device id), from allocated blocks."""

    def exit_counts(self) -> dict[str, int]:
        """VM exits that reached the VMM since start, by kind ("mmio", "io 0x3f8", ...): what a device costs."""

    def eventfd_counts(self) -> dict[str, int] | None:
        """With MEMVISOR_IOEVENTFD=1: the virtio queue notifies that came through ioeventfds instead of exits and
        the interrupts raised through irqfds ("notifies", "interrupts"); None when that fast path is off."""

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Install the function the machine calls for each event (None: drop events)."""
