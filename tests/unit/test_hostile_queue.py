"""A hostile driver against the split virtqueue and the devices behind it: in-flight heads and used-ring writes.

Issue 12 items 1 and 5: a driver that publishes the same head again and again must not make the device hold
more than a queue's worth of work (CVE-2016-5403 pattern); a queue the driver stopped (QueueReady=0) is never
written again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.devices.pmem.device import QUEUE_SIZE as PMEM_QUEUE_SIZE
from memvisor.devices.pmem.protocol import REQUEST, RESPONSE, VIRTIO_PMEM_REQ_TYPE_FLUSH
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio import mmio
from memvisor.virtio.device import STATUS_DEVICE_NEEDS_RESET
from memvisor.virtio.queue import VirtqueueError
from memvisor.virtio.testing import VirtioDriver, attach, standalone_queue, test_memory

MIB = 1 << 20
PMEM_GPA = 1 << 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_pop_refuses_more_heads_in_flight_than_the_queue_holds() -> None:
    dq, sq = standalone_queue(8)
    head = dq.add_buffer([b"x"], [4])
    for _ in range(7):
        dq.publish(head)  # the same head again, never returned (add_buffer published it once)
    for _ in range(8):
        assert sq.pop() is not None
    assert sq.in_flight_total == 8
    dq.publish(head)
    with pytest.raises(VirtqueueError, match="size exceeded") as info:
        sq.pop()
    assert info.value.head is None  # no head to answer: the device must be reset
    sq.push_used(head, 0)
    assert sq.in_flight_total == 7
    assert sq.pop() is not None  # one returned, one more may be taken


class _GatedFsync:
    """An fsync that blocks until the test opens the gate (a slow disk)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        assert self.gate.wait(30)


def _gated_pmem(tmp_path: Path) -> tuple[GuestMemory, _GatedFsync, VirtioPmemDevice, VirtioDriver]:
    """A pmem device over a 4 MiB file whose fsync blocks until the test opens the gate, with its driver."""
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(4 * MIB))
    memory = test_memory()
    memory.add(MemoryRegion.file(PMEM_GPA, path, 4 * MIB, name="pmem"))
    fsync = _GatedFsync()
    device = VirtioPmemDevice(memory.region_at(PMEM_GPA), fsync=fsync)
    driver = attach(device, memory)
    return memory, fsync, device, driver


def test_pmem_republishing_one_head_is_bounded_and_breaks_the_device(tmp_path: Path) -> None:
    memory, fsync, device, driver = _gated_pmem(tmp_path)
    queue = driver.queues[0]
    head = queue.add_buffer([REQUEST.pack(VIRTIO_PMEM_REQ_TYPE_FLUSH)], [RESPONSE.size])
    queue.kick()
    before = _rss_bytes()
    try:
        for _ in range(100_000):
            queue.publish(head)
            queue.kick()
        grown = _rss_bytes() - before
        assert driver.status & STATUS_DEVICE_NEEDS_RESET
        assert len(device._pending) <= PMEM_QUEUE_SIZE
        assert driver.transport.queues[0].in_flight_total <= PMEM_QUEUE_SIZE
        assert grown < 1 * MIB, f"the VMM grew by {grown} bytes"
    finally:
        fsync.gate.set()
        device.close()
        memory.close()


def test_no_used_ring_write_after_queue_ready_cleared(tmp_path: Path) -> None:
    memory, fsync, device, driver = _gated_pmem(tmp_path)
    queue = driver.queues[0]
    try:
        queue.add_buffer([REQUEST.pack(VIRTIO_PMEM_REQ_TYPE_FLUSH)], [RESPONSE.size])
        queue.kick()
        driver.write_reg(mmio.QUEUE_SEL, 0)
        driver.write_reg(mmio.QUEUE_READY, 0)
        used_area = memory.read(queue.used_addr, 16)
        fsync.gate.set()
        assert device.wait_idle(10)
        assert memory.read(queue.used_addr, 16) == used_area  # the stopped ring was not touched
        assert not driver.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        fsync.gate.set()
        device.close()
        memory.close()


def test_balloon_stats_buffer_is_not_returned_into_a_stopped_queue() -> None:
    from memvisor.devices.balloon import BalloonDevice
    from memvisor.devices.balloon.constants import QueueRole
    from memvisor.devices.balloon.testing import TOTAL_RAM, BalloonDriver, balloon_memory

    memory = balloon_memory()
    driver = BalloonDriver(BalloonDevice(TOTAL_RAM), memory)
    stats = driver.queues[QueueRole.STATS]
    driver.virtio.write_reg(mmio.QUEUE_SEL, stats.index)
    driver.virtio.write_reg(mmio.QUEUE_READY, 0)
    used_area = memory.read(stats.used_addr, 16)
    irqs = driver.virtio.irq_count
    driver.device.request_stats()  # what the stats timer does
    assert memory.read(stats.used_addr, 16) == used_area
    assert driver.virtio.irq_count == irqs and not driver.broken
    memory.close()
