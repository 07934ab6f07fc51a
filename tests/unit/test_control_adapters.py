"""The adapters over the real device models, served through QMP: what the VMM's glue will do."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from memvisor.control.adapters import (
    BalloonAdapter,
    DeviceEvents,
    set_mem_requested_size,
    virtio_mem_info,
)
from memvisor.control.fake import FakeMachine
from memvisor.control.machine_api import STAT_NOT_REPORTED, BalloonControl, EventSink, MemoryDeviceInfo
from memvisor.control.server import QmpServer
from memvisor.devices.balloon.device import BalloonDevice
from memvisor.devices.mem.device import VirtioMemDevice
from memvisor.memory.guest_memory import MemoryRegion

GiB = 1 << 30
MiB = 1 << 20


class DeviceMachine(FakeMachine):
    """FakeMachine whose balloon and virtio-mem are the real device models behind the adapters."""

    def __init__(self) -> None:
        super().__init__(balloon=False, virtio_mem=None, pmem=None)
        self.device_events = DeviceEvents()
        self.balloon_device = BalloonDevice(GiB, free_page_hint=True)
        self.balloon_device.add_change_listener(self.device_events.balloon_changed)
        self.region = MemoryRegion.memfd(4 * GiB, 1 * GiB, "vm0")
        self.mem_device = VirtioMemDevice(
            self.region, block_size=2 * MiB, on_size_change=self.device_events.mem_size_changed("vm0")
        )
        self.adapter = BalloonAdapter(self.balloon_device, "balloon0")

    def set_event_sink(self, sink: EventSink | None) -> None:
        super().set_event_sink(sink)
        self.device_events.sink = sink

    def balloon(self) -> BalloonControl | None:
        return self.adapter

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        return [virtio_mem_info(self.mem_device, "vm0")]

    def set_requested_size(self, device_id: str, size: int) -> None:
        set_mem_requested_size(self.mem_device, size)


@pytest.fixture
def machine() -> Iterator[DeviceMachine]:
    machine = DeviceMachine()
    yield machine
    machine.balloon_device.close()
    machine.region.close()


@pytest.fixture
def server(machine: DeviceMachine) -> Iterator[QmpServer]:
    directory = tempfile.mkdtemp(prefix="qmpdev-", dir="/tmp")
    with QmpServer(os.path.join(directory, "qmp.sock"), machine) as srv:
        yield srv
    shutil.rmtree(directory, ignore_errors=True)


async def _run(path: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    client = QMPClient("adapters")
    await client.connect(path)
    out: list[Any] = []
    for name, arguments in commands:
        try:
            out.append(await client.execute(name, arguments))
        except ExecuteError as err:
            out.append({"error": err.error_class, "desc": str(err)})
    await client.disconnect()
    return out


def test_real_devices_through_qmp(server: QmpServer, machine: DeviceMachine) -> None:
    replies = asyncio.run(
        _run(
            server.path,
            ("balloon", {"value": 512 * MiB}),
            ("query-balloon", None),
            ("qom-get", {"path": "balloon0", "property": "guest-stats"}),
            ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval", "value": 3}),
            ("qom-get", {"path": "balloon0", "property": "guest-stats-polling-interval"}),
            ("qom-set", {"path": "vm0", "property": "requested-size", "value": 256 * MiB}),
            ("query-memory-devices", None),
            ("x-balloon-hint-start", None),
        )
    )
    assert machine.balloon_device.target_bytes() == 512 * MiB
    assert replies[1] == {"actual": GiB}  # no driver yet: nothing given back
    stats = replies[2]["stats"]
    assert stats and all(value == STAT_NOT_REPORTED for value in stats.values())
    assert replies[4] == 3
    data = replies[6][0]["data"]
    assert (data["requested-size"], data["size"], data["max-size"], data["memaddr"]) == (
        256 * MiB,
        0,
        GiB,
        4 * GiB,
    )
    assert replies[7]["error"] == "GenericError" and "free page hinting" in replies[7]["desc"]


def test_device_callbacks_become_events(machine: DeviceMachine) -> None:
    seen: list[tuple[str, Any]] = []
    machine.set_event_sink(lambda name, data: seen.append((name, data)))
    machine.device_events.balloon_changed(768 * MiB)
    machine.device_events.mem_size_changed("vm0")(4 * MiB)
    assert seen == [
        ("BALLOON_CHANGE", {"actual": 768 * MiB}),
        ("MEMORY_DEVICE_SIZE_CHANGE", {"id": "vm0", "size": 4 * MiB, "qom-path": "/machine/peripheral/vm0"}),
    ]
    machine.set_event_sink(None)
    machine.device_events.balloon_changed(GiB)
    assert len(seen) == 2
