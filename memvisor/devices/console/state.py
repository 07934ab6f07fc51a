"""The virtio-console device's own state as data: host bytes not yet delivered, and its counters.

Its queues and registers are the transport's (memvisor.virtio.state); this is what the device adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.devices.console.device import COUNTER_NAMES, VirtioConsoleDevice
from memvisor.snapshot.codec import require

MAX_PENDING = 16 << 20


@dataclass(frozen=True)
class ConsoleState:
    pending: bytes
    counters: tuple[tuple[str, int], ...]

    def validate(self) -> None:
        require(len(self.pending) <= MAX_PENDING, "pending", f"{len(self.pending)} bytes is over {MAX_PENDING}")
        names = [name for name, _ in self.counters]
        require(sorted(names) == sorted(COUNTER_NAMES), "counters", f"are {names}, expected {list(COUNTER_NAMES)}")
        for name, value in self.counters:
            require(value >= 0, f"counters.{name}", "is negative")


def save_console(device: VirtioConsoleDevice) -> ConsoleState:
    with device.lock:
        return ConsoleState(device.pending_output(), tuple(sorted(device.counters.items())))


def restore_console(device: VirtioConsoleDevice, state: ConsoleState) -> None:
    """Before the transport (whose activation delivers the pending bytes)."""
    with device.lock:
        device.load_pending_output(state.pending)
        device.counters = dict(state.counters)
