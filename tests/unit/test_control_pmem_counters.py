"""x-query-pmem: a real virtio-pmem device's counters reach a QMP client (and stay out of QEMU's replies)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from memvisor.control.adapters import virtio_pmem_info
from memvisor.control.fake import FakeMachine
from memvisor.control.machine_api import MemoryDeviceInfo
from memvisor.control.server import QmpServer
from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.memory.guest_memory import MemoryRegion

MiB = 1 << 20


class PmemMachine(FakeMachine):
    """FakeMachine with one real VirtioPmemDevice behind the adapter."""

    def __init__(self, path: Path) -> None:
        super().__init__(balloon=False, virtio_mem=None, pmem=None)
        self.region = MemoryRegion.file(8 << 30, path, 4 * MiB, readonly=False, name="pmem-pm0")
        self.device = VirtioPmemDevice(self.region)

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        return [virtio_pmem_info(self.device, "pm0")]


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[PmemMachine]:
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(4 * MiB))
    machine = PmemMachine(path)
    yield machine
    machine.device.close()
    machine.region.close()


async def _ask(path: str, *names: str) -> list[Any]:
    client = QMPClient("pmem-counters")
    await client.connect(path)
    replies = [await client.execute(name) for name in names]
    await client.disconnect()
    return replies


def test_flush_counters_are_served(machine: PmemMachine, tmp_path: Path) -> None:
    machine.device.count("flush_requests", 3)
    machine.device.count("flushes_ok", 2)
    machine.device.count("flush_errors")
    with QmpServer(os.path.join(tmp_path, "qmp.sock"), machine) as server:
        pmem, devices = asyncio.run(_ask(server.path, "x-query-pmem", "query-memory-devices"))
    assert pmem == [
        {
            "id": "pm0",
            "memaddr": 8 << 30,
            "size": 4 * MiB,
            "counters": {
                "flush-requests": 3,
                "flushes-ok": 2,
                "flush-errors": 1,
                "bad-requests": 0,
                "flush-microseconds-total": 0,
            },
        }
    ]
    assert devices == [{"type": "virtio-pmem", "data": {"memaddr": 8 << 30, "size": 4 * MiB,
                                                        "memdev": "/objects/pm0-mem", "id": "pm0"}}]  # fmt: skip
