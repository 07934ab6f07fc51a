"""The split virtqueue, device side (virtio 1.2 section 2.7).

Three areas in guest memory, all written by a possibly hostile driver:

- the descriptor table (`desc_addr`): `size` descriptors {addr u64, len u32, flags u16, next u16},
- the driver area or available ring (`driver_addr`): {flags u16, idx u16, ring[size] u16, used_event u16},
- the device area or used ring (`device_addr`): {flags u16, idx u16, ring[size] {id u32, len u32},
  avail_event u16}.

`pop()` takes the next available head and walks its descriptor chain into a `DescriptorChain` of plain
`Descriptor` copies: every descriptor is read from guest memory exactly once, so a driver changing the table
after the check cannot change what the device uses. The walk refuses (with `VirtqueueError`):

- an available index running more than `size` ahead of the last one seen, a head or `next` out of range,
- chains longer than the queue (which is how loops are caught), indirect tables longer than
  `MAX_INDIRECT_DESCRIPTORS` or with loops,
- buffers not wholly inside one region of guest RAM (or wrapping past 2**64), device-writable buffers in a
  read-only region,
- a device-readable descriptor after a device-writable one.

Zero-length descriptors are checked for order but left out of the chain: they carry nothing.
- indirect descriptors when VIRTIO_F_INDIRECT_DESC was not negotiated, an indirect table whose length is 0
  or not a multiple of 16, INDIRECT together with NEXT, an indirect descriptor inside an indirect table.

A device that gets `VirtqueueError` should answer the head (`push_used(error.head, 0)` when `error.head` is
not None: the head counts as popped) if it can, or raise so the transport marks it DEVICE_NEEDS_RESET.
`in_flight` counts the popped heads not yet returned, so tests can check that no head leaks, and
`in_flight_total` their sum. No queue ever holds more than `size` heads in flight: a driver that makes a
head available again before it was returned (the CVE-2016-5403 pattern, which would make the device queue
unbounded work) gets `VirtqueueError` with no head from `pop()`, as QEMU's "Virtqueue size exceeded", and the
transport marks the device DEVICE_NEEDS_RESET. `push_used` returns a buffer (and writes nothing once the
driver cleared QueueReady: virtio 1.2 section 4.2.2.1, the device MUST NOT touch a queue it was told to
stop); `should_interrupt` decides whether the driver wants to hear about it (VIRTQ_AVAIL_F_NO_INTERRUPT, or
used_event with VIRTIO_F_EVENT_IDX).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass

from memvisor.errors import GuestFault
from memvisor.memory.guest_memory import GuestMemory, GuestMemoryError

# Descriptor flags, virtio 1.2 section 2.7.5.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags, virtio 1.2 sections 2.7.6 and 2.7.8.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# struct virtq_desc, virtio 1.2 section 2.7.5.
DESC = struct.Struct("<QIHH")
# struct virtq_used_elem, virtio 1.2 section 2.7.8.
USED_ELEM = struct.Struct("<II")

# Alignment of the three areas, virtio 1.2 section 2.7 (table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

MAX_QUEUE_SIZE = 32768
# Linux allocates indirect tables as large as the scatter list; QEMU caps a chain at 1024 entries.
MAX_INDIRECT_DESCRIPTORS = 1024
ADDRESS_LIMIT = 1 << 64


def desc_table_size(size: int) -> int:
    return DESC.size * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 4 + 2 * size + 2


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size] of used elements, avail_event."""
    return 4 + USED_ELEM.size * size + 2


class VirtqueueError(GuestFault):
    """A malformed ring or descriptor chain (a guest fault). `head` is the chain's head index when it is known."""

    def __init__(self, message: str, head: int | None = None):
        super().__init__(message)
        self.head = head


@dataclass(frozen=True)
class Descriptor:
    """One buffer of a chain, copied out of guest memory: [addr, addr+length) is inside guest RAM."""

    addr: int
    length: int
    write_only: bool


class _Length(int):
    """An int that can also be called, so `chain.readable_length` and `chain.readable_length()` both work."""

    def __call__(self) -> int:
        return int(self)


class DescriptorChain:
    """A checked descriptor chain: device-readable buffers first, then device-writable ones."""

    def __init__(self, head: int, readable: list[Descriptor], writable: list[Descriptor]):
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_length(self) -> _Length:
        return _Length(sum(d.length for d in self.readable))

    @property
    def writable_length(self) -> _Length:
        return _Length(sum(d.length for d in self.writable))

    def read_all(self, memory: GuestMemory, limit: int) -> bytes:
        """The readable buffers concatenated, at most `limit` bytes."""
        parts: list[bytes] = []
        remaining = max(limit, 0)
        try:
            for desc in self.readable:
                if remaining <= 0:
                    break
                take = min(desc.length, remaining)
                parts.append(memory.read(desc.addr, take))
                remaining -= take
        except GuestMemoryError as err:
            raise VirtqueueError(f"chain {self.head}: {err}", self.head) from err
        return b"".join(parts)

    def write_all(self, memory: GuestMemory, data: bytes | bytearray | memoryview) -> int:
        """Write `data` across the writable buffers in order; return the bytes written (what fits)."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            for desc in self.writable:
                if done >= len(view):
                    break
                take = min(desc.length, len(view) - done)
                memory.write(desc.addr, view[done:done + take])
                done += take
        except GuestMemoryError as err:
            raise VirtqueueError(f"chain {self.head}: {err}", self.head) from err
        return done

    def __repr__(self) -> str:
        return f"<DescriptorChain head={self.head} readable={self.readable} writable={self.writable}>"


class SplitVirtqueue:
    """The device side of one split virtqueue.

    The transport fills `size`, `desc_addr`, `driver_addr`, `device_addr`, calls `enable()` when the driver
    sets QueueReady, and sets `event_idx` / `indirect_desc` from the negotiated features.
    """

    def __init__(self, index: int, max_size: int, memory: GuestMemory):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue {index}: maximum size {max_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.memory = memory
        self.event_idx = False
        self.indirect_desc = True
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset: not ready, size = max_size, no addresses, indexes 0."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.last_avail_idx = 0
        self.next_used_idx = 0
        self._signalled_used = 0
        self._checked: tuple[int, int, int, int] | None = None
        self.in_flight: Counter[int] = Counter()
        self.in_flight_total = 0
        self.event_idx = False

    @property
    def signalled_used(self) -> int:
        """The used index at the driver's last notification (VIRTIO_F_EVENT_IDX suppression counts from it)."""
        return self._signalled_used

    @signalled_used.setter
    def signalled_used(self, value: int) -> None:  # a snapshot's restore
        self._signalled_used = value

    # --- layout -------------------------------------------------------------------------------------

    def check_layout(self) -> None:
        """Raise VirtqueueError unless size and the three areas are valid (virtio 1.2 sections 2.7, 4.2.3.2)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue {self.index}: size {size} is not a power of two from 1 to {self.max_size}")
        areas = (
            ("descriptor table", self.desc_addr, desc_table_size(size), DESC_ALIGN),
            ("available ring", self.driver_addr, avail_ring_size(size), AVAIL_ALIGN),
            ("used ring", self.device_addr, used_ring_size(size), USED_ALIGN),
        )
        for name, addr, length, align in areas:
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.contains(addr, length):
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x}+{length:#x} is outside guest RAM")
        if self.memory.region_at(self.device_addr).readonly:
            raise VirtqueueError(f"queue {self.index}: used ring at {self.device_addr:#x} is in read-only memory")
        self._checked = (size, self.desc_addr, self.driver_addr, self.device_addr)

    def enable(self) -> None:
        """Check the layout and mark the queue ready (the driver wrote 1 to QueueReady)."""
        self.check_layout()
        self.ready = True

    def _ensure_layout(self) -> None:
        if self._checked != (self.size, self.desc_addr, self.driver_addr, self.device_addr):
            self.check_layout()

    # --- available side ---------------------------------------------------------------------------

    def available(self) -> int:
        """How many heads the driver has made available and the device not yet popped."""
        if not self.ready:
            return 0
        self._ensure_layout()
        try:
            avail_idx = self.memory.read_u16(self.driver_addr + 2)
        except GuestMemoryError as err:
            raise VirtqueueError(f"queue {self.index}: {err}") from err
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(f"queue {self.index}: available index {avail_idx} is {pending} entries ahead of "
                                 f"{self.last_avail_idx}, more than the queue size {self.size}")
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, None when there is none; VirtqueueError if the ring or chain is malformed."""
        if not self.available():
            return None
        size = self.size
        if self.in_flight_total >= size:
            raise VirtqueueError(f"queue {self.index}: virtqueue size exceeded: {self.in_flight_total} heads in "
                                 f"flight, the queue holds {size}")
        try:
            head = self.memory.read_u16(self.driver_addr + 4 + 2 * (self.last_avail_idx % size))
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            if self.event_idx:
                self.memory.write_u16(self.device_addr + 4 + USED_ELEM.size * size, self.last_avail_idx)
        except GuestMemoryError as err:
            raise VirtqueueError(f"queue {self.index}: {err}") from err
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: head {head} is out of range for size {size}", head)
        self.in_flight_total += 1
        self.in_flight[head] += 1  # counted before the walk, so a device may answer a malformed chain too
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        readable: list[Descriptor] = []
        writable: list[Descriptor] = []
        table = b""  # the copied indirect table, once inside one
        table_len = self.size
        budget = self.size
        indirect = False
        seen_writable = False
        index = head
        count = 0
        while True:
            if index >= table_len:
                raise VirtqueueError(f"queue {self.index} chain {head}: next {index} is out of range", head)
            count += 1
            if count > budget:
                raise VirtqueueError(f"queue {self.index} chain {head}: more than {budget} descriptors (a loop?)",
                                     head)
            if indirect:
                addr, length, flags, next_index = DESC.unpack_from(table, DESC.size * index)
            else:
                try:
                    raw = self.memory.read(self.desc_addr + DESC.size * index, DESC.size)
                except GuestMemoryError as err:
                    raise VirtqueueError(f"queue {self.index} chain {head}: {err}", head) from err
                addr, length, flags, next_index = DESC.unpack(raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table = self._indirect_table(head, addr, length, flags, indirect)
                indirect = True
                table_len = budget = len(table) // DESC.size
                index = count = 0
                continue
            write_only = bool(flags & VIRTQ_DESC_F_WRITE)
            self._check_buffer(head, addr, length, write_only)
            if write_only:
                seen_writable = True
            elif seen_writable:
                raise VirtqueueError(f"queue {self.index} chain {head}: readable descriptor after a writable one",
                                     head)
            if length:  # an empty buffer carries nothing: leave it out
                (writable if write_only else readable).append(Descriptor(addr, length, write_only))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable)
            index = next_index

    def _indirect_table(self, head: int, addr: int, length: int, flags: int, nested: bool) -> bytes:
        """Check an indirect descriptor (virtio 1.2 section 2.7.5.3) and copy its table out once."""
        where = f"queue {self.index} chain {head}"
        if not self.indirect_desc:
            raise VirtqueueError(f"{where}: indirect descriptor without VIRTIO_F_INDIRECT_DESC", head)
        if nested:
            raise VirtqueueError(f"{where}: indirect descriptor inside an indirect table", head)
        if flags & VIRTQ_DESC_F_NEXT:
            raise VirtqueueError(f"{where}: descriptor has both INDIRECT and NEXT", head)
        if length == 0 or length % DESC.size:
            raise VirtqueueError(f"{where}: indirect table length {length} is not a positive multiple of 16", head)
        if length // DESC.size > MAX_INDIRECT_DESCRIPTORS:
            raise VirtqueueError(f"{where}: indirect table of {length // DESC.size} entries is over "
                                 f"{MAX_INDIRECT_DESCRIPTORS}", head)
        try:
            return self.memory.read(addr, length)
        except GuestMemoryError as err:
            raise VirtqueueError(f"{where}: indirect table: {err}", head) from err

    def _check_buffer(self, head: int, addr: int, length: int, write_only: bool) -> None:
        if length == 0:
            return  # an empty buffer touches no memory
        if addr + length > ADDRESS_LIMIT or not self.memory.contains(addr, length):
            raise VirtqueueError(f"queue {self.index} chain {head}: buffer {addr:#x}+{length:#x} is outside guest RAM",
                                 head)
        if write_only and self.memory.region_at(addr).readonly:
            raise VirtqueueError(f"queue {self.index} chain {head}: writable buffer {addr:#x} is in read-only memory",
                                 head)

    # --- used side --------------------------------------------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver, telling it `written` bytes were written into its buffers.

        Once the driver cleared QueueReady the ring is no longer the device's: nothing is written and the head
        is forgotten (the driver resets the queue or the device before using it again).
        """
        if not 0 <= head < self.size:
            raise VirtqueueError(f"queue {self.index}: cannot return head {head}, out of range", head)
        if not 0 <= written < 1 << 32:
            raise VirtqueueError(f"queue {self.index}: written length {written} does not fit 32 bits", head)
        if self.in_flight[head] <= 0:
            raise VirtqueueError(f"queue {self.index}: head {head} was not popped", head)
        if not self.ready:
            self._forget(head)
            return
        self._ensure_layout()
        slot = self.device_addr + 4 + USED_ELEM.size * (self.next_used_idx % self.size)
        try:
            self.memory.write(slot, USED_ELEM.pack(head, written))
            self.next_used_idx = (self.next_used_idx + 1) & 0xFFFF
            self.memory.write_u16(self.device_addr + 2, self.next_used_idx)
        except GuestMemoryError as err:
            raise VirtqueueError(f"queue {self.index}: {err}", head) from err
        self._forget(head)

    def _forget(self, head: int) -> None:
        self.in_flight[head] -= 1
        self.in_flight_total -= 1
        if not self.in_flight[head]:
            del self.in_flight[head]

    def should_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers pushed since the last call."""
        new, old = self.next_used_idx, self._signalled_used
        self._signalled_used = new
        if new == old or not self.ready:
            return False
        try:
            if self.event_idx:
                used_event = self.memory.read_u16(self.driver_addr + 4 + 2 * self.size)
                # vring_need_event: has new passed used_event since old? (virtio 1.2 section 2.7.10)
                return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
            return not self.memory.read_u16(self.driver_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError:
            return True

    def __repr__(self) -> str:
        return (f"<SplitVirtqueue {self.index} size={self.size}/{self.max_size} ready={self.ready} "
                f"avail={self.last_avail_idx} used={self.next_used_idx}>")
