"""QMP events: builders for the exact shape of each event memvisor emits, and the timestamped message.

A QMP event on the wire (QEMU docs/interop/qmp-spec.txt, section 2.5):
    {"event": "BALLOON_CHANGE", "data": {"actual": 536870912}, "timestamp": {"seconds": S, "microseconds": U}}
`data` is left out when an event has none (STOP, RESUME), as QEMU does.

The machine calls `sink(name, data)`; use these builders so the data matches QEMU 7.2:
    sink(*balloon_change(actual))  ->  ("BALLOON_CHANGE", {"actual": actual})
"""

from __future__ import annotations

import time
from typing import Any

from memvisor.control.machine_api import EventData

Event = tuple[str, EventData]

PERIPHERAL = "/machine/peripheral"


def balloon_change(actual: int) -> Event:
    """The guest's RAM minus the balloon changed (QAPI BALLOON_CHANGE)."""
    return "BALLOON_CHANGE", {"actual": actual}


def memory_device_size_change(device_id: str, size: int) -> Event:
    """A virtio-mem device's plugged size changed (QAPI MEMORY_DEVICE_SIZE_CHANGE, qom-path since 7.2)."""
    return "MEMORY_DEVICE_SIZE_CHANGE", {
        "id": device_id,
        "size": size,
        "qom-path": f"{PERIPHERAL}/{device_id}",
    }


def stop() -> Event:
    """The vCPUs were paused."""
    return "STOP", None


def resume() -> Event:
    """The vCPUs run again."""
    return "RESUME", None


def shutdown(guest: bool, reason: str) -> Event:
    """The VM shut down. QEMU reasons: host-qmp-quit, guest-shutdown, host-signal, ... (QAPI ShutdownCause)."""
    return "SHUTDOWN", {"guest": guest, "reason": reason}


def powerdown() -> Event:
    """The ACPI power button was pressed (QAPI POWERDOWN)."""
    return "POWERDOWN", None


def reset(guest: bool, reason: str) -> Event:
    """The machine was reset (QAPI RESET)."""
    return "RESET", {"guest": guest, "reason": reason}


def event_message(name: str, data: EventData, now: float | None = None) -> dict[str, Any]:
    """The QMP wire form of an event, stamped with `now` (seconds since the epoch; default: the time now)."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    message: dict[str, Any] = {"event": name}
    if data is not None:
        message["data"] = data
    message["timestamp"] = {"seconds": seconds, "microseconds": int((stamp - seconds) * 1_000_000)}
    return message
