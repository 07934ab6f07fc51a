"""The virtio-pmem device's own state as data: the size and path of its backing file, and its counters.

The persistent memory's contents are the backing file itself: a snapshot does not copy them, and a restore
needs the same file (refused, naming the field, when its size differs). Quiesce: `quiesce_pmem` waits for
the flushes in flight (the worker answers them before the state is read) and the caller then holds the lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.devices.pmem.device import COUNTER_NAMES, VirtioPmemDevice
from memvisor.errors import MemvisorError
from memvisor.snapshot.codec import StateError, require
from memvisor.units import format_size

FLUSH_WAIT = 30.0


@dataclass(frozen=True)
class PmemState:
    size: int
    readonly: bool
    counters: tuple[tuple[str, int], ...]

    def validate(self) -> None:
        require(self.size > 0, "size", "is not positive")
        for name, value in self.counters:
            require(value >= 0, f"counters.{name}", "is negative")


def quiesce_pmem(device: VirtioPmemDevice) -> None:
    """Let the flushes in flight finish (they write their answers into guest memory)."""
    if not device.wait_idle(FLUSH_WAIT):
        raise MemvisorError(f"virtio-pmem flushes did not finish within {FLUSH_WAIT:.0f} s: try the snapshot again")


def save_pmem(device: VirtioPmemDevice) -> PmemState:
    with device.lock:
        return PmemState(device.size, device.readonly, tuple(sorted(device.counters.items())))


def check_pmem(device: VirtioPmemDevice, state: PmemState, where: str) -> None:
    if state.size != device.size:
        raise StateError(
            f"{where}.size: the snapshot's pmem backing file was {format_size(state.size)}, {device.region.name} "
            f"is {format_size(device.size)}: restore with the same backing file as when it was saved"
        )
    if state.readonly != device.readonly:
        raise StateError(f"{where}.readonly: the snapshot's pmem was {'read-only' if state.readonly else 'writable'}: "
                         "give the same readonly= as when it was saved")  # fmt: skip


def restore_pmem(device: VirtioPmemDevice, state: PmemState) -> None:
    with device.lock:
        device.counters = {name: 0 for name in COUNTER_NAMES} | {n: v for n, v in state.counters if n in COUNTER_NAMES}
