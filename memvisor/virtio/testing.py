"""A driver-side virtio helper for tests: what Linux's virtio_mmio + virtio_ring drivers do, in Python.

Device tests need a driver that lays out real rings in guest memory and speaks to the transport the way
Linux does. This module gives one, plus a small allocator for guest buffers:

- `test_memory(size)`: a GuestMemory with one memfd RAM region at GPA 0 (16 MiB by default).
- `GuestAllocator(memory, start, end)`: first-fit allocation of guest buffers (`alloc`, `free`).
- `VirtioDriver(memory, transport)`: `init()` performs the handshake (reset, ACKNOWLEDGE, DRIVER, read and
  write features, FEATURES_OK and check it stuck, set up each queue, DRIVER_OK); config reads with the
  generation retry loop; interrupt acknowledge.
- `DriverQueue` (`driver.queues[i]`): `add_buffer(out, in_sizes, indirect=False) -> head` writes real
  descriptors (optionally an indirect table), `kick()`, `get_used() -> [(head, written, in_data)]`, and raw
  helpers to write hostile descriptors and ring entries (`write_desc`, `publish`, `set_avail_idx`, ...).
- `attach(device)`: memory + transport + initialised driver in one call, counting raised IRQs.
- `standalone_queue(size)`: a DriverQueue and the device's SplitVirtqueue over the same rings, with no
  device or transport in between (for tests of the queue itself or of a device's chain handling).

Example (a device test)::

    from memvisor.virtio.testing import attach

    driver = attach(MyDevice())                 # handshake done, all queues set up, DRIVER_OK set
    q = driver.queues[0]
    head = q.add_buffer([b"request"], [4])      # 7 readable bytes, then 4 writable bytes
    q.kick()                                    # the device's notify(0) runs
    assert q.get_used() == [(head, 4, b"\\0\\0\\0\\0")]
    assert driver.irq_count == 1
    assert not driver.transport.status & STATUS_DEVICE_NEEDS_RESET

Hostile input::

    q.write_desc(0, addr=0, length=16, flags=VIRTQ_DESC_F_NEXT, next=0)   # a loop
    q.publish(0)
    q.kick()                                    # the device must answer or mark itself broken
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio import mmio
from memvisor.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.queue import (
    DESC,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitVirtqueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

TEST_MEMORY_SIZE = 16 << 20
_REG = struct.Struct("<I")


class DriverError(Exception):
    """The device refused something a well-behaved driver does (the test should usually fail)."""


def test_memory(size: int = TEST_MEMORY_SIZE, gpa: int = 0) -> GuestMemory:
    """A GuestMemory with one memfd RAM region of `size` bytes at `gpa`."""
    return GuestMemory([MemoryRegion.memfd(gpa, size, "test-ram")])


test_memory.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


class GuestAllocator:
    """First-fit allocator of guest physical ranges inside [start, end)."""

    def __init__(self, memory: GuestMemory, start: int | None = None, end: int | None = None):
        region = memory.regions[0]
        self.memory = memory
        self.start = region.gpa if start is None else start
        self.end = region.end if end is None else end
        self._free: list[tuple[int, int]] = [(self.start, self.end - self.start)]  # sorted (addr, size)
        self._sizes: dict[int, int] = {}

    def alloc(self, size: int, align: int = 16) -> int:
        """A zeroed range of `size` bytes (at least 1) aligned to `align`; DriverError when full."""
        size = max(size, 1)
        for i, (addr, length) in enumerate(self._free):
            start = -(-addr // align) * align
            if start + size <= addr + length:
                pieces = [(addr, start - addr), (start + size, addr + length - start - size)]
                self._free[i:i + 1] = [p for p in pieces if p[1] > 0]
                self._sizes[start] = size
                self.memory.write(start, bytes(size))
                return start
        raise DriverError(f"test guest memory is full ({size} bytes wanted)")

    def free(self, addr: int) -> None:
        size = self._sizes.pop(addr)
        self._free.append((addr, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged


@dataclass
class _Pending:
    descs: list[int]
    buffers: list[int]
    in_buffers: list[tuple[int, int]]
    extra: list[int] = field(default_factory=list)


class DriverQueue:
    """The driver side of one split virtqueue laid out in guest memory (like Linux vring_create_virtqueue)."""

    def __init__(self, driver: VirtioDriver, index: int, size: int):
        self.driver = driver
        self.memory = driver.memory
        self.index = index
        self.size = size
        alloc = driver.allocator
        self.desc_addr = alloc.alloc(desc_table_size(size), 16)
        self.avail_addr = alloc.alloc(avail_ring_size(size), 2)
        self.used_addr = alloc.alloc(used_ring_size(size), 4)
        self.avail_idx = 0
        self.last_used_idx = 0
        self._free_descs = list(range(size))
        self._pending: dict[int, _Pending] = {}

    # --- well-behaved use -------------------------------------------------------------------------

    def add_buffer(self, out: list[bytes], in_sizes: list[int], *, indirect: bool = False) -> int:
        """Make one chain available: readable buffers holding `out`, then writable ones of `in_sizes` bytes."""
        needed = 1 if indirect else len(out) + len(in_sizes)
        if needed > len(self._free_descs):
            raise DriverError(f"queue {self.index}: {needed} descriptors wanted, {len(self._free_descs)} free")
        buffers: list[int] = []
        entries: list[tuple[int, int, int]] = []  # addr, length, flags
        in_buffers: list[tuple[int, int]] = []
        for data in out:
            addr = self.driver.allocator.alloc(len(data))
            self.memory.write(addr, data)
            buffers.append(addr)
            entries.append((addr, len(data), 0))
        for length in in_sizes:
            addr = self.driver.allocator.alloc(length)
            buffers.append(addr)
            in_buffers.append((addr, length))
            entries.append((addr, length, VIRTQ_DESC_F_WRITE))
        if not entries:
            raise DriverError("a buffer needs at least one element")
        if indirect:
            table = self.driver.allocator.alloc(DESC.size * len(entries), 16)
            for i, (addr, length, flags) in enumerate(entries):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(entries) else 0
                self.memory.write(table + DESC.size * i, DESC.pack(addr, length, flags | more, i + 1 if more else 0))
            head = self._take_descs(1)[0]
            self.write_desc(head, table, DESC.size * len(entries), VIRTQ_DESC_F_INDIRECT, 0)
            pending = _Pending([head], buffers, in_buffers, [table])
        else:
            descs = self._take_descs(len(entries))
            for i, (addr, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                self.write_desc(descs[i], addr, length, flags | (VIRTQ_DESC_F_NEXT if more else 0),
                                descs[i + 1] if more else 0)
            head = descs[0]
            pending = _Pending(descs, buffers, in_buffers)
        self._pending[head] = pending
        self.publish(head)
        return head

    def _take_descs(self, count: int) -> list[int]:
        taken, self._free_descs = self._free_descs[:count], self._free_descs[count:]
        return taken

    def kick(self) -> None:
        """Notify the device (QueueNotify)."""
        self.driver.write_reg(mmio.QUEUE_NOTIFY, self.index)

    def get_used(self) -> list[tuple[int, int, bytes]]:
        """The chains the device returned since the last call: (head, written, bytes of the writable buffers).

        `in_data` is the writable buffers' contents concatenated, cut at `written`; their descriptors and
        buffers are freed.
        """
        used_idx = self.memory.read_u16(self.used_addr + 2)
        result: list[tuple[int, int, bytes]] = []
        while self.last_used_idx != used_idx:
            slot = self.used_addr + 4 + USED_ELEM.size * (self.last_used_idx % self.size)
            head, written = USED_ELEM.unpack(self.memory.read(slot, USED_ELEM.size))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            pending = self._pending.pop(head, None)
            data = b""
            if pending is not None:
                data = b"".join(self.memory.read(a, n) for a, n in pending.in_buffers)[:written]
                for addr in pending.buffers + pending.extra:
                    self.driver.allocator.free(addr)
                self._free_descs.extend(pending.descs)
            result.append((head, written, data))
        if self.driver.features >> VIRTIO_F_RING_EVENT_IDX & 1:
            self.set_used_event(self.last_used_idx)  # like Linux: interrupt me for the next one
        return result

    @property
    def outstanding(self) -> int:
        """Chains made available with add_buffer and not yet returned."""
        return len(self._pending)

    # --- raw access for hostile tests -------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next: int = 0) -> None:
        """Write descriptor `index` of the table verbatim (index taken modulo the size)."""
        self.memory.write(self.desc_addr + DESC.size * (index % self.size),
                          DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF, flags & 0xFFFF, next & 0xFFFF))

    def publish(self, head: int) -> None:
        """Put `head` in the next available ring slot and advance the available index."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail_addr, flags)

    def suppress_interrupts(self, suppress: bool = True) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT if suppress else 0)

    def set_used_event(self, value: int) -> None:
        """With EVENT_IDX: interrupt me when the used index passes `value`."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        """With EVENT_IDX: the available index the device wants a notification for."""
        return self.memory.read_u16(self.used_addr + 4 + USED_ELEM.size * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + 2)


class VirtioDriver:
    """The driver side of one virtio-mmio device, initialised like Linux's virtio_mmio driver."""

    def __init__(self, memory: GuestMemory, transport: VirtioMmioTransport,
                 allocator: GuestAllocator | None = None):
        self.memory = memory
        self.transport = transport
        self.allocator = allocator or GuestAllocator(memory)
        self.queues: list[DriverQueue] = []
        self.features = 0
        self.irq_count = 0

    # --- registers --------------------------------------------------------------------------------

    def read_reg(self, offset: int) -> int:
        return int(_REG.unpack(self.transport.read(offset, 4))[0])

    def write_reg(self, offset: int, value: int) -> None:
        self.transport.write(offset, _REG.pack(value & 0xFFFF_FFFF))

    @property
    def status(self) -> int:
        return self.read_reg(mmio.STATUS)

    def add_status(self, bits: int) -> None:
        self.write_reg(mmio.STATUS, self.status | bits)

    def device_features(self) -> int:
        self.write_reg(mmio.DEVICE_FEATURES_SEL, 1)
        high = self.read_reg(mmio.DEVICE_FEATURES)
        self.write_reg(mmio.DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read_reg(mmio.DEVICE_FEATURES)

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write_reg(mmio.DRIVER_FEATURES_SEL, sel)
            self.write_reg(mmio.DRIVER_FEATURES, features >> (32 * sel))

    # --- initialisation ---------------------------------------------------------------------------

    def init(self, features: int | None = None, queue_sizes: list[int | None] | None = None,
             *, indirect: bool = True, event_idx: bool = False, driver_ok: bool = True) -> int:
        """The Linux handshake; returns the negotiated features.

        `features`: what the driver accepts (default: everything offered, minus INDIRECT_DESC / EVENT_IDX
        unless `indirect` / `event_idx`); it is intersected with the offer. `queue_sizes[i]`: the size for
        queue i (None or missing: its QueueNumMax; 0: do not set that queue up).
        """
        if self.read_reg(mmio.MAGIC_VALUE) != mmio.MAGIC or self.read_reg(mmio.VERSION) != 2:
            raise DriverError("not a virtio-mmio version 2 device")
        self.write_reg(mmio.STATUS, 0)
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        wanted = offered if features is None else features & offered
        if features is None:
            if not indirect:
                wanted &= ~(1 << VIRTIO_F_RING_INDIRECT_DESC)
            if not event_idx:
                wanted &= ~(1 << VIRTIO_F_RING_EVENT_IDX)
        wanted |= 1 << VIRTIO_F_VERSION_1
        self.write_features(wanted)
        self.add_status(STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            raise DriverError(f"device refused features {wanted:#x}")
        self.features = wanted
        self.queues = []
        count = len(self.transport.queues)
        sizes = list(queue_sizes or []) + [None] * count
        for index in range(count):
            size = sizes[index]
            if size == 0:
                continue
            self.queues.append(self.setup_queue(index, size))
        if driver_ok:
            self.add_status(STATUS_DRIVER_OK)
        return wanted

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Lay out queue `index` in guest memory and make it ready (QueueNum, addresses, QueueReady)."""
        self.write_reg(mmio.QUEUE_SEL, index)
        if self.read_reg(mmio.QUEUE_READY):
            raise DriverError(f"queue {index} is already set up")
        max_size = self.read_reg(mmio.QUEUE_NUM_MAX)
        if not max_size:
            raise DriverError(f"queue {index} does not exist")
        queue = DriverQueue(self, index, size or max_size)
        self.write_reg(mmio.QUEUE_NUM, queue.size)
        for low, addr in ((mmio.QUEUE_DESC_LOW, queue.desc_addr), (mmio.QUEUE_DRIVER_LOW, queue.avail_addr),
                          (mmio.QUEUE_DEVICE_LOW, queue.used_addr)):
            self.write_reg(low, addr)
            self.write_reg(low + 4, addr >> 32)
        self.write_reg(mmio.QUEUE_READY, 1)
        if not self.read_reg(mmio.QUEUE_READY):
            raise DriverError(f"device refused queue {index} of size {queue.size}")
        return queue

    def queue(self, index: int) -> DriverQueue:
        """The set-up queue with device index `index`."""
        for queue in self.queues:
            if queue.index == index:
                return queue
        raise KeyError(index)

    # --- config space and interrupts --------------------------------------------------------------

    def read_config(self, offset: int, length: int) -> bytes:
        """Config bytes read in 4-byte (or smaller) accesses, retried until ConfigGeneration is stable."""
        while True:
            before = self.read_reg(mmio.CONFIG_GENERATION)
            data = b"".join(self.transport.read(mmio.CONFIG + offset + i, min(4, length - i))
                            for i in range(0, length, 4))
            if self.read_reg(mmio.CONFIG_GENERATION) == before:
                return data

    def read_config_u32(self, offset: int) -> int:
        return int(_REG.unpack(self.read_config(offset, 4))[0])

    def read_config_u64(self, offset: int) -> int:
        low, high = struct.unpack("<II", self.read_config(offset, 8))
        return int(high) << 32 | int(low)

    def write_config(self, offset: int, data: bytes) -> None:
        self.transport.write(mmio.CONFIG + offset, data)

    def ack_interrupt(self) -> int:
        """Read InterruptStatus and acknowledge it; return the bits that were set."""
        status = self.read_reg(mmio.INTERRUPT_STATUS)
        if status:
            self.write_reg(mmio.INTERRUPT_ACK, status)
        return status

    def _count_irq(self) -> None:
        self.irq_count += 1


def attach(device: VirtioDevice, memory: GuestMemory | None = None, **init_options: object) -> VirtioDriver:
    """A transport for `device` over `memory` (default: `test_memory()`) and an initialised driver.

    `init_options` go to `VirtioDriver.init` (features, queue_sizes, indirect, event_idx, driver_ok).
    `driver.irq_count` counts interrupts the transport raised.
    """
    memory = memory or test_memory()
    holder: list[VirtioDriver] = []
    transport = VirtioMmioTransport(device, memory, lambda: holder[0]._count_irq())
    driver = VirtioDriver(memory, transport)
    holder.append(driver)
    driver.init(**init_options)  # type: ignore[arg-type]
    return driver


class _NullDevice(VirtioDevice):
    """A device with one queue that does nothing: the transport behind `standalone_queue`."""

    device_id = 0

    def __init__(self, max_size: int):
        super().__init__()
        self.queue_max_sizes = (max_size,)

    def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def read_config(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        pass

    def notify(self, queue_index: int) -> None:
        pass

    def reset(self) -> None:
        pass


def standalone_queue(size: int = 16, memory: GuestMemory | None = None, *, max_size: int | None = None,
                     event_idx: bool = False, indirect: bool = True) -> tuple[DriverQueue, SplitVirtqueue]:
    """A driver queue of `size` entries laid out in `memory` and the enabled device queue reading it.

    `max_size` (default `size`) is the device queue's maximum; `event_idx` / `indirect` are the negotiated
    ring features. `kick()` on the driver queue does nothing here: call the device side yourself.
    """
    memory = memory or test_memory()
    max_size = max_size or size
    transport = VirtioMmioTransport(_NullDevice(max_size), memory, lambda: None)
    driver = VirtioDriver(memory, transport)
    if event_idx:
        driver.features |= 1 << VIRTIO_F_RING_EVENT_IDX
    dq = DriverQueue(driver, 0, size)
    driver.queues.append(dq)
    sq = SplitVirtqueue(0, max_size, memory)
    sq.size = size
    sq.desc_addr, sq.driver_addr, sq.device_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
    sq.event_idx = event_idx
    sq.indirect_desc = indirect
    sq.enable()
    return dq, sq
