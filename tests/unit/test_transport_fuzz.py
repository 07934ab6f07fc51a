"""A hypothesis stateful fuzz of the virtio-mmio transport in front of each device (issue 12).

A hostile driver writes arbitrary registers, ring contents and config bytes, mixed with well-formed steps
(a full handshake, real buffers) so the fuzz reaches deep states. After every step:

- no exception escapes: the transport's `read`/`write` never raise, and the only errors a device reports to
  the transport (DEVICE_NEEDS_RESET) are the guest-fault kinds (a malformed ring, a refused access, a device
  error), never a Python bug (TypeError, IndexError, AssertionError...);
- host memory held stays within RAM + plugged virtio-mem + a small constant (pmem is the user's file);
- no queue has more heads in flight than its size;
- a reset (Status 0) returns transport and device queues to their initial state.

Bounded: 60 examples of up to 50 steps per device, seconds each (well under the 2 minutes CI allows).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.console import VirtioConsoleDevice
from memvisor.devices.mem import VirtioMemDevice
from memvisor.devices.mem.protocol import MemRequest
from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.memory.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion
from memvisor.virtio import mmio
from memvisor.virtio.device import VirtioDevice, VirtioDeviceError
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.queue import VirtqueueError
from memvisor.virtio.testing import DriverError, DriverQueue, VirtioDriver

MiB = 1 << 20
RAM = 16 * MiB
VMEM_GPA = 1 << 32
VMEM_SIZE = 128 * MiB
PMEM_GPA = 1 << 30
PMEM_SIZE = 2 * MiB
SLACK = 2 * MiB  # host memory a device may hold beyond RAM and plugged memory (nothing, today)
GUEST_FAULTS = (VirtqueueError, GuestMemoryError, VirtioDeviceError)

REGISTERS = [mmio.MAGIC_VALUE, mmio.DEVICE_FEATURES, mmio.DEVICE_FEATURES_SEL, mmio.DRIVER_FEATURES,
             mmio.DRIVER_FEATURES_SEL, mmio.QUEUE_SEL, mmio.QUEUE_NUM_MAX, mmio.QUEUE_NUM, mmio.QUEUE_READY,
             mmio.QUEUE_NOTIFY, mmio.INTERRUPT_STATUS, mmio.INTERRUPT_ACK, mmio.STATUS, mmio.QUEUE_DESC_LOW,
             mmio.QUEUE_DESC_HIGH, mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DRIVER_HIGH, mmio.QUEUE_DEVICE_LOW,
             mmio.QUEUE_DEVICE_HIGH, mmio.QUEUE_RESET, mmio.CONFIG_GENERATION]
u32 = st.integers(0, 0xFFFF_FFFF)
small = st.integers(0, 40)
# Addresses a hostile descriptor may name: RAM, its edges, virtio-mem (plugged or not), pmem, nowhere.
addresses = st.one_of(st.integers(0, RAM - 1), st.sampled_from([0, RAM - 8, RAM, VMEM_GPA, VMEM_GPA + 4 * MiB,
                                                                PMEM_GPA, 2**64 - 16]),
                      st.integers(VMEM_GPA, VMEM_GPA + VMEM_SIZE - 1))


class TransportFuzz(RuleBasedStateMachine):
    """Subclasses set `make_device(memory, tmpdir)`."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.memory = GuestMemory([MemoryRegion.memfd(0, RAM, "ram")])
        self.device = self.make_device(self.memory, self.tmp.name)
        self.faults: list[BaseException] = []
        self.transport = VirtioMmioTransport(self.device, self.memory, lambda: None)
        failed = self.transport._device_failed

        def record(error: BaseException) -> None:
            self.faults.append(error)
            failed(error)

        self.transport._device_failed = record  # type: ignore[method-assign]
        self.device.bind_failure(record)
        self.driver = VirtioDriver(self.memory, self.transport)
        self.initial = self._state()

    def make_device(self, memory: GuestMemory, tmpdir: str) -> VirtioDevice:
        raise NotImplementedError

    def teardown(self) -> None:
        closer = getattr(self.device, "close", None)
        if closer is not None:
            closer()
        self.memory.close()
        self.tmp.cleanup()

    def _state(self) -> tuple[object, ...]:
        t = self.transport
        return (t.status, t.interrupt_status, t.driver_features,
                [(q.ready, q.size, q.desc_addr, q.driver_addr, q.device_addr, q.last_avail_idx, q.next_used_idx,
                  q.in_flight_total) for q in t.queues])

    def _queue(self, index: int) -> DriverQueue | None:
        queues = self.driver.queues
        return queues[index % len(queues)] if queues else None

    # --- well-formed steps ----------------------------------------------------------------------------

    @rule()
    def handshake(self) -> None:
        with contextlib.suppress(DriverError):  # a device may refuse; the transport must still answer
            self.driver.init()

    @rule(index=small, out=st.lists(st.binary(max_size=64), max_size=2), ins=st.lists(st.integers(1, 64), max_size=2),
          indirect=st.booleans())
    def add_buffer(self, index: int, out: list[bytes], ins: list[int], indirect: bool) -> None:
        queue = self._queue(index)
        if queue is None or not (out or ins):
            return
        try:
            queue.add_buffer(out, ins, indirect=indirect)
        except (DriverError, MemoryError, GuestMemoryError):
            return
        queue.kick()

    @rule(index=small, addr=st.sampled_from([VMEM_GPA, VMEM_GPA + 2 * MiB, VMEM_GPA + 126 * MiB]),
          kind=st.integers(0, 4), blocks=st.integers(0, 70))
    def mem_request(self, index: int, addr: int, kind: int, blocks: int) -> None:
        queue = self._queue(index)
        if queue is None:
            return
        try:
            queue.add_buffer([MemRequest(kind, addr, blocks).encode()], [10])
        except (DriverError, MemoryError, GuestMemoryError):
            return
        queue.kick()

    @rule()
    def collect(self) -> None:
        for queue in self.driver.queues:
            with contextlib.suppress(GuestMemoryError):
                queue.get_used()

    # --- hostile steps --------------------------------------------------------------------------------

    @rule(offset=st.sampled_from(REGISTERS), value=u32)
    def write_register(self, offset: int, value: int) -> None:
        self.transport.write(offset, struct.pack("<I", value))

    @rule(offset=st.integers(-8, 0x1008), data=st.binary(min_size=0, max_size=9))
    def write_anywhere(self, offset: int, data: bytes) -> None:
        self.transport.write(offset, data)

    @rule(offset=st.integers(-8, 0x1008), length=st.integers(0, 9))
    def read_anywhere(self, offset: int, length: int) -> None:
        data = self.transport.read(offset, length)
        assert isinstance(data, bytes)

    @rule(index=small, slot=st.integers(0, 300), addr=addresses, length=u32, flags=st.integers(0, 7),
          next_=st.integers(0, 300), publish=st.booleans())
    def hostile_descriptor(self, index: int, slot: int, addr: int, length: int, flags: int, next_: int,
                           publish: bool) -> None:
        queue = self._queue(index)
        if queue is None:
            return
        queue.write_desc(slot, addr, length, flags, next_)
        if publish:
            queue.publish(slot)
            queue.kick()

    @rule(index=small, value=st.integers(0, 0xFFFF), kick=st.booleans())
    def hostile_avail_idx(self, index: int, value: int, kick: bool) -> None:
        queue = self._queue(index)
        if queue is None:
            return
        queue.set_avail_idx(value)
        if kick:
            queue.kick()

    @rule(addr=st.integers(0, RAM - 64), data=st.binary(min_size=1, max_size=64))
    def scribble(self, addr: int, data: bytes) -> None:
        """The guest writes anything anywhere in its RAM: rings, tables, buffers."""
        self.memory.write(addr, data)

    @rule()
    def reset(self) -> None:
        self.transport.write(mmio.STATUS, struct.pack("<I", 0))
        closer = getattr(self.device, "wait_idle", None)
        if closer is not None:
            closer(10)
        assert self._state() == self.initial

    # --- invariants -----------------------------------------------------------------------------------

    @invariant()
    def only_guest_faults(self) -> None:
        bugs = [err for err in self.faults if not isinstance(err, GUEST_FAULTS)]
        assert not bugs, f"a device failed with a bug, not a guest fault: {bugs[0]!r}"

    @invariant()
    def in_flight_bounded(self) -> None:
        for queue in self.transport.queues:
            assert 0 <= queue.in_flight_total <= queue.size or not queue.ready and queue.in_flight_total <= 32768
            assert queue.in_flight_total <= queue.max_size

    @invariant()
    def host_memory_bounded(self) -> None:
        plugged = getattr(self.device, "plugged_size", 0)
        held = sum(r.allocated_bytes() for r in self.memory.regions if r.balloon_target)
        assert held <= RAM + plugged + SLACK


class BalloonFuzz(TransportFuzz):
    def make_device(self, memory: GuestMemory, tmpdir: str) -> VirtioDevice:
        return BalloonDevice(RAM, free_page_hint=True, free_page_reporting=True, stats_polling_interval=0)


class MemFuzz(TransportFuzz):
    def make_device(self, memory: GuestMemory, tmpdir: str) -> VirtioDevice:
        region = MemoryRegion.memfd(VMEM_GPA, VMEM_SIZE, "vmem")
        memory.add(region)
        return VirtioMemDevice(region, requested_size=32 * MiB)


class PmemFuzz(TransportFuzz):
    def make_device(self, memory: GuestMemory, tmpdir: str) -> VirtioDevice:
        path = os.path.join(tmpdir, "pmem.img")
        with open(path, "wb") as f:
            f.truncate(PMEM_SIZE)
        region = MemoryRegion.file(PMEM_GPA, path, PMEM_SIZE, name="pmem")
        memory.add(region)
        return VirtioPmemDevice(region)


class ConsoleFuzz(TransportFuzz):
    def make_device(self, memory: GuestMemory, tmpdir: str) -> VirtioDevice:
        device = VirtioConsoleDevice(lambda data: None)
        device.send(b"hello from the host")
        return device


FUZZ = settings(max_examples=60, stateful_step_count=50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBalloonTransportFuzz = BalloonFuzz.TestCase
TestMemTransportFuzz = MemFuzz.TestCase
TestPmemTransportFuzz = PmemFuzz.TestCase
TestConsoleTransportFuzz = ConsoleFuzz.TestCase
for _case in (TestBalloonTransportFuzz, TestMemTransportFuzz, TestPmemTransportFuzz, TestConsoleTransportFuzz):
    _case.settings = FUZZ
del _case
