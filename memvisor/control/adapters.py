"""Glue from memvisor's device models to the control plane's view (machine_api), so the VMM writes little.

- `BalloonAdapter(device, "balloon0", dirty_log=machine)` is a `BalloonControl` over a devices.balloon
  `BalloonDevice`; with a `DirtyPageLog` (the VMM's Machine) its free page hints track the guest's writes.
- `virtio_mem_info(device, "vm0")` / `virtio_pmem_info(device, "pm0")` describe the memory devices.
- `DeviceEvents` turns the devices' callbacks into QMP events for whatever sink the server installs:

    events = DeviceEvents()
    balloon.add_change_listener(events.balloon_changed)
    mem = VirtioMemDevice(region, on_size_change=events.mem_size_changed("vm0"))
    ...
    def set_event_sink(self, sink): events.sink = sink     # in the VMM's MachineControl

The device modules are imported only for type checking: this module works with any object that has the same
methods (tests use the real devices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from memvisor.control import events as ev
from memvisor.control.machine_api import (
    GUEST_STAT_NAMES,
    STAT_NOT_REPORTED,
    EventSink,
    HintState,
    HintStatus,
    MachineError,
    VirtioMemInfo,
    VirtioPmemInfo,
)
from memvisor.errors import MemvisorError

if TYPE_CHECKING:
    import numpy as np

    from memvisor.devices.balloon.device import BalloonDevice
    from memvisor.devices.mem.device import VirtioMemDevice
    from memvisor.devices.pmem.device import VirtioPmemDevice

PAGE_SIZE = 4096
# the device model's hinting states (devices/balloon/hinting.py) in the control plane's words
_HINT_STATES = {
    "idle": HintState.IDLE,
    "requested": HintState.REQUESTED,
    "active": HintState.RUNNING,
    "stopped": HintState.STOPPED,
    "done": HintState.DONE,
}


class DeviceEvents:
    """Forwards device callbacks to `sink` (set by the server through MachineControl.set_event_sink)."""

    def __init__(self) -> None:
        self.sink: EventSink | None = None

    def _emit(self, event: ev.Event) -> None:
        sink = self.sink
        if sink is not None:
            sink(*event)

    def balloon_changed(self, guest_memory_bytes: int) -> None:
        """BalloonDevice change listener: the guest's RAM minus the balloon is now `guest_memory_bytes`."""
        self._emit(ev.balloon_change(guest_memory_bytes))

    def mem_size_changed(self, device_id: str) -> Callable[[int], None]:
        """A VirtioMemDevice `on_size_change` hook for device `device_id`."""
        return lambda size: self._emit(ev.memory_device_size_change(device_id, size))


class DirtyPageLog(Protocol):
    """KVM's record of guest writes to RAM, as memvisor.vmm.machine.Machine offers it."""

    @property
    def dirty_logging(self) -> bool: ...

    def start_dirty_log(self) -> None: ...

    def stop_dirty_log(self) -> None: ...

    def dirty_pages(self) -> np.ndarray:
        """Pages written since the previous call: a bool array indexed by guest PFN."""


def _per_hint_source(log: DirtyPageLog) -> Callable[[int, int], np.ndarray]:
    """What the device asks before each hint (of `count` pages from PFN `first`): the PFN array when the log
    offers one (cost in proportion to the writes; the Machine's also has KVM log the hint's pages anew), else
    the bool mask (O(RAM) per hint)."""
    pfns = getattr(log, "dirty_pfns", None)
    if pfns is not None:
        return pfns  # type: ignore[no-any-return]
    return lambda first, count: log.dirty_pages()


class BalloonAdapter:
    """`BalloonControl` over a BalloonDevice.

    With `dirty_log`, a hinting cycle is exact about writes: dirty logging is on before the command id reaches
    the guest, the device drops a page's hint when the guest writes the page after hinting it, and every read
    of the hinted set (and the end of a cycle) first applies the writes logged so far.
    """

    def __init__(self, device: BalloonDevice, device_id: str, dirty_log: DirtyPageLog | None = None) -> None:
        self.device = device
        self.id = device_id
        self._dirty_log = dirty_log
        self._cycles: list[HintStatus] = []  # finished cycles, newest last (at most 16 kept)

    def set_target_bytes(self, target: int) -> None:
        self.device.set_target(target)  # a refusal is a UsageError: QMP maps it once, at its boundary

    def actual_bytes(self) -> int:
        return self.device.guest_memory_bytes()

    def guest_stats(self) -> dict[str, Any]:
        """The device's guest-stats as QEMU 7.2 shows them: its ten stats only (the device also keeps the newer
        tags 10-15, which QEMU 7.2 does not report), and -1 for "never reported" written as 2**64 - 1."""
        value = self.device.guest_stats()
        stats = value.get("stats", {})
        assert isinstance(stats, dict)
        fixed = {
            name: STAT_NOT_REPORTED if stats.get(name, -1) == -1 else stats[name] for name in GUEST_STAT_NAMES
        }
        return {"stats": fixed, "last-update": value.get("last-update", 0)}

    def stats_polling_interval(self) -> int:
        return int(self.device.stats_polling_interval)

    def set_stats_polling_interval(self, seconds: int) -> None:
        self.device.set_stats_polling_interval(seconds)

    def _current(self) -> HintStatus:
        hinting = self.device.hinting
        pages = int(self.device.hinted_pages().sum())
        state = _HINT_STATES.get(self.device.hint_state.value, HintState.IDLE)
        return HintStatus(hinting.current_id or 0, state, pages, pages * PAGE_SIZE)

    def _apply_dirty_log(self) -> None:
        """Drop the hints of pages the guest wrote since the last look (under the device lock, so a hint that
        arrives meanwhile is not judged by writes that came before it)."""
        log = self._dirty_log
        if log is None or not log.dirty_logging:
            return
        with self.device.lock:
            try:
                pfns = getattr(log, "dirty_pfns", None)  # the written PFNs: no bool per page of RAM
                dirty = pfns() if pfns is not None else log.dirty_pages()
            except Exception as err:  # the log is lost: no hint can be trusted any more
                self.device.clear_hinted([(0, 1 << 52)])  # all of guest physical memory
                raise MachineError(f"reading KVM's dirty log failed ({err}): the hints were dropped") from err
            self.device.clear_hinted(dirty)

    def hint_start(self) -> HintStatus:
        """Turn dirty logging on (once), then offer the guest a new command id."""
        self._apply_dirty_log()
        if self._current().state is not HintState.IDLE:
            self._cycles = [*self._cycles[-15:], self._current()]
        log = self._dirty_log
        started_log = log is not None and not log.dirty_logging
        try:
            if log is not None:
                self.device.hinting.dirty_source = _per_hint_source(log)
                log.start_dirty_log()
            self.device.start_hinting()
        except MemvisorError:
            if log is not None and started_log:
                log.stop_dirty_log()  # no cycle started: no need to slow the guest's writes
            raise
        return self._current()

    def hint_stop(self) -> HintStatus:
        """End the cycle: apply the dirty log, then write STOP and at once DONE (state "done").

        STOP ends the guest's reporting; DONE lets it reuse the blocks it holds. The Linux driver acts on the
        latest command id it reads, so it need not see STOP first, and the device ignores hints once a cycle
        has left "running", so there is nothing to wait for: the host never makes the guest hold its free
        memory past this command (QEMU writes DONE when migration ends). The hinted set stays readable with
        x-query-balloon-hints and keeps losing the pages the guest writes from now on.
        """
        self._apply_dirty_log()
        self.device.stop_hinting()
        self.device.done_hinting()
        return self._current()

    def hinted_ranges(self) -> list[tuple[int, int]]:
        self._apply_dirty_log()
        return self.device.hinted_ranges()

    def hint_status(self) -> list[HintStatus]:
        self._apply_dirty_log()
        current = self._current()
        return [*self._cycles, current] if current.state is not HintState.IDLE else list(self._cycles)


def virtio_mem_info(device: VirtioMemDevice, device_id: str) -> VirtioMemInfo:
    """A VirtioMemDevice as query-memory-devices shows it (node 0 when the device has no NUMA node)."""
    return VirtioMemInfo(
        id=device_id,
        memaddr=device.addr,
        node=device.node_id or 0,
        requested_size=device.requested_size,
        size=device.plugged_size,
        max_size=device.region_size,
        block_size=device.block_size,
    )


def virtio_pmem_info(device: VirtioPmemDevice, device_id: str) -> VirtioPmemInfo:
    with device.lock:
        counters = dict(device.counters)
    return VirtioPmemInfo(id=device_id, memaddr=device.start, size=device.size, counters=counters)


def set_mem_requested_size(device: VirtioMemDevice, size: int) -> None:
    """MachineControl.set_requested_size for one device; a refusal (UsageError) goes to QMP as it is."""
    device.set_requested_size(size)
