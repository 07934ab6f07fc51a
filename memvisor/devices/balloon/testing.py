"""The Linux virtio_balloon driver's side of the balloon protocol, for tests (over memvisor.virtio.testing).

`BalloonDriver` does what drivers/virtio/virtio_balloon.c does on the wire: it negotiates, sets up only the
queues of the negotiated features (so indexes after deflate count only those), puts its first stats buffer
on the stats queue before DRIVER_OK, writes poison_val, sends PFN arrays (le32, 4 KiB pages) on inflate and
deflate, echoes hinting command ids and sends free blocks as device-writable buffers, and reports free
ranges as one chain of device-writable buffers. `raw_chain` writes any chain, for hostile tests.

Example::

    driver = BalloonDriver(BalloonDevice(ram_size), memory)
    driver.inflate(range(4096, 4096 + 256))     # one buffer of 256 PFNs, returned by the device
    driver.set_actual(256)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from memvisor.devices.balloon.constants import (
    CMD_ID,
    CONFIG,
    CONFIG_ACTUAL,
    CONFIG_POISON_VAL,
    PFN,
    STAT,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_STATS_VQ,
    QueueRole,
    queue_roles,
)
from memvisor.devices.balloon.device import BalloonDevice
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio.device import STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK
from memvisor.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from memvisor.virtio.testing import DriverQueue, VirtioDriver, attach

Used = list[tuple[int, int, bytes]]

MiB = 1 << 20
# The layout of `balloon_memory()`: rings and driver buffers in region 0 (the test allocator uses the first
# region), a hole, then the RAM the tests inflate, hint and report.
RINGS_SIZE = 8 * MiB
RAM_GPA = 16 * MiB
RAM_SIZE = 80 * MiB
RAM_PFN = RAM_GPA >> 12
TOTAL_RAM = RINGS_SIZE + RAM_SIZE


def balloon_memory() -> GuestMemory:
    """Two memfd regions: "rings" [0, 8 MiB) and "ram" [16 MiB, 96 MiB); 8-16 MiB is not memory."""
    return GuestMemory([MemoryRegion.memfd(0, RINGS_SIZE, "rings"), MemoryRegion.memfd(RAM_GPA, RAM_SIZE, "ram")])


def pfn_array(pfns: Iterable[int]) -> bytes:
    """An inflate/deflate buffer: le32 PFNs."""
    return b"".join(PFN.pack(pfn & 0xFFFF_FFFF) for pfn in pfns)


def stats_buffer(entries: Iterable[tuple[int, int]]) -> bytes:
    """A stats buffer: packed (le16 tag, le64 value) entries."""
    return b"".join(STAT.pack(tag, value) for tag, value in entries)


class BalloonDriver:
    """A Linux-like balloon driver bound to `device` through a virtio-mmio transport over `memory`."""

    def __init__(self, device: BalloonDevice, memory: GuestMemory, *, features: int | None = None,
                 stats: Iterable[tuple[int, int]] | None = ((4, 1 << 20), (5, 2 << 20)),
                 poison_val: int | None = None, indirect: bool = False):
        offered_roles = len(device.queue_max_sizes)
        # Set up no queue at first: which indexes exist depends on the negotiated features.
        self.virtio: VirtioDriver = attach(device, memory, features=features, driver_ok=False,
                                           queue_sizes=[0] * offered_roles, indirect=indirect)
        self.device = device
        self.memory = memory
        self.features = self.virtio.features
        self.queues: dict[QueueRole, DriverQueue] = {}
        for index, role in enumerate(queue_roles(self.features)):
            self.queues[role] = self.virtio.setup_queue(index)
        self._raw_next: dict[QueueRole, int] = {}
        if self.features >> VIRTIO_BALLOON_F_STATS_VQ & 1 and stats is not None:
            self.queues[QueueRole.STATS].add_buffer([stats_buffer(stats)], [])
            self.queues[QueueRole.STATS].kick()  # before DRIVER_OK, like Linux: the transport ignores it
        if self.features >> VIRTIO_BALLOON_F_PAGE_POISON & 1 and poison_val is not None:
            self.virtio.write_config(CONFIG_POISON_VAL, struct.pack("<I", poison_val))
        self.virtio.add_status(STATUS_DRIVER_OK)

    @property
    def broken(self) -> bool:
        """The device set DEVICE_NEEDS_RESET."""
        return bool(self.virtio.status & STATUS_DEVICE_NEEDS_RESET)

    def config(self) -> tuple[int, int, int, int]:
        """num_pages, actual, free_page_hint_cmd_id, poison_val as the driver reads them."""
        num_pages, actual, cmd_id, poison = CONFIG.unpack(self.virtio.read_config(0, CONFIG.size))
        return num_pages, actual, cmd_id, poison

    def set_actual(self, pages: int) -> None:
        self.virtio.write_config(CONFIG_ACTUAL, struct.pack("<I", pages))

    def send(self, role: QueueRole, out: list[bytes], in_sizes: list[int] | None = None) -> Used:
        """Add one buffer on the queue of `role`, kick, and return what the device gave back."""
        queue = self.queues[role]
        queue.add_buffer(out, in_sizes or [])
        queue.kick()
        return queue.get_used()

    def inflate(self, pfns: Iterable[int]) -> Used:
        return self.send(QueueRole.INFLATE, [pfn_array(pfns)])

    def deflate(self, pfns: Iterable[int]) -> Used:
        return self.send(QueueRole.DEFLATE, [pfn_array(pfns)])

    def refill_stats(self, entries: Iterable[tuple[int, int]]) -> bool:
        """If the device returned the stats buffer, put a fresh one back (stats_handle_request)."""
        queue = self.queues[QueueRole.STATS]
        if not queue.get_used():
            return False
        queue.add_buffer([stats_buffer(entries)], [])
        queue.kick()
        return True

    def raw_chain(self, role: QueueRole, entries: list[tuple[int, int, bool]]) -> int:
        """Publish a chain of (addr, length, device-writable) descriptors verbatim; return its head."""
        queue = self.queues[role]
        start = self._raw_next.get(role, 0)
        indexes = [(start + i) % queue.size for i in range(len(entries))]
        self._raw_next[role] = (start + len(entries)) % queue.size
        for i, (addr, length, writable) in enumerate(entries):
            more = i + 1 < len(entries)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if more else 0)
            queue.write_desc(indexes[i], addr, length, flags, indexes[i + 1] if more else 0)
        queue.publish(indexes[0])
        return indexes[0]

    def send_cmd_id(self, cmd_id: int, at: int) -> Used:
        """Echo a hinting command id (a 4-byte readable buffer written at guest address `at`)."""
        self.memory.write(at, CMD_ID.pack(cmd_id))
        self.raw_chain(QueueRole.FREE_PAGE, [(at, CMD_ID.size, False)])
        self.queues[QueueRole.FREE_PAGE].kick()
        return self.queues[QueueRole.FREE_PAGE].get_used()

    def hint(self, ranges: Iterable[tuple[int, int]]) -> Used:
        """One device-writable buffer per free block (get_free_page_and_send), then one kick."""
        for addr, length in ranges:
            self.raw_chain(QueueRole.FREE_PAGE, [(addr, length, True)])
        self.queues[QueueRole.FREE_PAGE].kick()
        return self.queues[QueueRole.FREE_PAGE].get_used()

    def report(self, ranges: Iterable[tuple[int, int]]) -> Used:
        """One chain of device-writable buffers naming free ranges (virtballoon_free_page_report)."""
        self.raw_chain(QueueRole.REPORTING, [(addr, length, True) for addr, length in ranges])
        self.queues[QueueRole.REPORTING].kick()
        return self.queues[QueueRole.REPORTING].get_used()
