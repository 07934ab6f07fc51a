"""Glue from memvisor's device models to the control plane's view (machine_api), so the VMM writes little.

- `BalloonAdapter(device, "balloon0")` is a `BalloonControl` over a devices.balloon `BalloonDevice`.
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
from typing import TYPE_CHECKING, Any

from memvisor.control import events as ev
from memvisor.control.machine_api import (
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


class BalloonAdapter:
    """`BalloonControl` over a BalloonDevice."""

    def __init__(self, device: BalloonDevice, device_id: str) -> None:
        self.device = device
        self.id = device_id
        self._cycles: list[HintStatus] = []  # finished cycles, newest last (at most 16 kept)

    def set_target_bytes(self, target: int) -> None:
        try:
            self.device.set_target(target)
        except MemvisorError as err:
            raise MachineError(str(err)) from err

    def actual_bytes(self) -> int:
        return self.device.guest_memory_bytes()

    def guest_stats(self) -> dict[str, Any]:
        """The device's guest-stats with its -1 for "never reported" written as QEMU writes it (2**64 - 1)."""
        value = self.device.guest_stats()
        stats = value.get("stats", {})
        assert isinstance(stats, dict)
        fixed = {name: STAT_NOT_REPORTED if n == -1 else n for name, n in stats.items()}
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

    def hint_start(self) -> HintStatus:
        if self._current().state is not HintState.IDLE:
            self._cycles = [*self._cycles[-15:], self._current()]
        try:
            self.device.start_hinting()
        except MemvisorError as err:
            raise MachineError(str(err)) from err
        return self._current()

    def hint_stop(self) -> HintStatus:
        try:
            self.device.stop_hinting()
        except MemvisorError as err:
            raise MachineError(str(err)) from err
        return self._current()

    def hint_status(self) -> list[HintStatus]:
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
    return VirtioPmemInfo(id=device_id, memaddr=device.start, size=device.size)


def set_mem_requested_size(device: VirtioMemDevice, size: int) -> None:
    """MachineControl.set_requested_size for one device; the device's refusal becomes a MachineError."""
    try:
        device.set_requested_size(size)
    except MemvisorError as err:
        raise MachineError(str(err)) from err
