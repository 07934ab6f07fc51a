"""The virtio-mmio transport: registers, status state machine, features, queues, device failures."""

import logging
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.memory.guest_memory import GuestMemory
from memvisor.virtio import mmio
from memvisor.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
    VirtioDeviceError,
    feature_bit,
    has_feature,
)
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.queue import SplitVirtqueue, VirtqueueError
from memvisor.virtio.testing import DriverError, VirtioDriver, attach, test_memory

READY = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
F_DEVICE_A = 0  # a device-specific feature bit
F_DEVICE_HIGH = 50  # the first device-specific bit above the reserved 24-49 (virtio 1.2 section 2.2)


class EchoDevice(VirtioDevice):
    """Queue 0 echoes the readable bytes reversed; records every call; can be told to fail."""

    device_id = 42
    queue_max_sizes = (16, 8)

    def __init__(self, extra_features: int = 0) -> None:
        super().__init__()
        self.config = bytearray(range(16))
        self.extra_features = extra_features
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.queues: list[SplitVirtqueue] = []
        self.memory: GuestMemory | None = None
        self.features = 0

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise VirtioDeviceError(f"{name} failed on purpose")

    def device_features(self) -> int:
        self._maybe_fail("device_features")
        return feature_bit(VIRTIO_F_VERSION_1) | feature_bit(F_DEVICE_A) | self.extra_features

    def read_config(self, offset: int, length: int) -> bytes:
        self._maybe_fail("read_config")
        return bytes(self.config[offset:offset + length])

    def write_config(self, offset: int, data: bytes) -> None:
        self._maybe_fail("write_config")
        self.config[offset:offset + len(data)] = data[: max(0, len(self.config) - offset)]

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        self._maybe_fail("activate")
        self.memory, self.queues, self.features = memory, queues, features

    def notify(self, queue_index: int) -> None:
        self._maybe_fail(f"notify{queue_index}")
        queue = self.queues[queue_index]
        assert self.memory is not None
        while (chain := queue.pop()) is not None:
            data = chain.read_all(self.memory, 4096)
            queue.push_used(chain.head, chain.write_all(self.memory, data[::-1]))
            self.count("requests")
        self.signal_used(queue)

    def reset(self) -> None:
        self._maybe_fail("reset")
        self.queues = []


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = test_memory()
    yield mem
    mem.close()


class Bench:
    """A transport over an EchoDevice with a driver that has not initialised yet."""

    def __init__(self, memory: GuestMemory, device: EchoDevice | None = None):
        self.device = device or EchoDevice()
        self.irqs = 0
        self.transport = VirtioMmioTransport(self.device, memory, self._irq)
        self.driver = VirtioDriver(memory, self.transport)

    def _irq(self) -> None:
        self.irqs += 1

    def reg(self, offset: int) -> int:
        return self.driver.read_reg(offset)

    def set_reg(self, offset: int, value: int) -> None:
        self.driver.write_reg(offset, value)


@pytest.fixture
def bench(memory: GuestMemory) -> Bench:
    return Bench(memory)


# --- identification and a full session --------------------------------------------------------------

def test_identification_registers(bench: Bench) -> None:
    assert bench.reg(mmio.MAGIC_VALUE) == 0x74726976
    assert bench.transport.read(mmio.MAGIC_VALUE, 4) == b"virt"
    assert bench.reg(mmio.VERSION) == 2
    assert bench.reg(mmio.DEVICE_ID) == 42
    assert bench.reg(mmio.VENDOR_ID) == 0x554D4551
    assert bench.reg(mmio.STATUS) == 0
    assert bench.reg(mmio.SHM_LEN_LOW) == bench.reg(mmio.SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_full_session_through_the_driver_helper(memory: GuestMemory) -> None:
    device = EchoDevice()
    driver = attach(device, memory)
    assert driver.status == READY
    assert device.calls.count("activate") == 1
    assert has_feature(device.features, VIRTIO_F_VERSION_1) and has_feature(device.features, F_DEVICE_A)
    assert [q.ready for q in device.queues] == [True, True]
    q = driver.queues[0]
    head = q.add_buffer([b"abc", b"def"], [6])
    q.kick()
    assert q.get_used() == [(head, 6, b"fedcba")]
    assert driver.irq_count == 1
    assert driver.ack_interrupt() == VIRTIO_MMIO_INT_VRING
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == 0
    head = q.add_buffer([b"xy"], [2], indirect=True)
    q.kick()
    assert q.get_used() == [(head, 2, b"yx")]
    assert device.counters["requests"] == 2


def test_event_idx_session(memory: GuestMemory) -> None:
    device = EchoDevice()
    driver = attach(device, memory, event_idx=True)
    assert has_feature(driver.features, VIRTIO_F_RING_EVENT_IDX)
    assert device.queues[0].event_idx
    q = driver.queues[0]
    for i in range(3):
        head = q.add_buffer([bytes([i])], [1])
        q.kick()
        assert q.get_used() == [(head, 1, bytes([i]))]
    assert driver.irq_count == 3
    assert q.avail_event() == 3


def test_driver_can_decline_ring_features(memory: GuestMemory) -> None:
    device = EchoDevice()
    driver = attach(device, memory, indirect=False)
    assert not has_feature(device.features, VIRTIO_F_RING_INDIRECT_DESC)
    q = driver.queues[0]
    q.add_buffer([b"x"], [1], indirect=True)
    q.kick()  # the device refuses the chain and the transport marks it broken
    assert driver.status & STATUS_DEVICE_NEEDS_RESET


# --- features -------------------------------------------------------------------------------------

def test_offered_features(bench: Bench) -> None:
    bench.device.extra_features = (feature_bit(VIRTIO_F_ACCESS_PLATFORM) | feature_bit(VIRTIO_F_RING_PACKED)
                                   | feature_bit(F_DEVICE_HIGH) | feature_bit(30) | feature_bit(45)
                                   | feature_bit(60))
    offered = bench.driver.device_features()
    assert has_feature(offered, VIRTIO_F_VERSION_1)
    assert has_feature(offered, VIRTIO_F_RING_INDIRECT_DESC) and has_feature(offered, VIRTIO_F_RING_EVENT_IDX)
    assert has_feature(offered, F_DEVICE_A) and has_feature(offered, F_DEVICE_HIGH)
    assert has_feature(offered, 60)  # device-specific bits are 0-23 and 50-127 (virtio 1.2 section 2.2)
    for bit in (VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, 30, 45):  # 41-49 are reserved
        assert not has_feature(offered, bit)
    bench.set_reg(mmio.DEVICE_FEATURES_SEL, 2)
    assert bench.reg(mmio.DEVICE_FEATURES) == 0


def _to_features_ok(bench: Bench, features: int) -> int:
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE)
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    bench.driver.write_features(features)
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    return bench.reg(mmio.STATUS)


def test_features_ok_needs_version_1(bench: Bench) -> None:
    status = _to_features_ok(bench, feature_bit(F_DEVICE_A))
    assert status == STATUS_ACKNOWLEDGE | STATUS_DRIVER


def test_driver_helper_reports_refused_features(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.transport, "_features_acceptable", lambda: False)
    with pytest.raises(DriverError, match="refused features"):
        bench.driver.init()


def test_features_ok_refuses_features_not_offered(bench: Bench) -> None:
    status = _to_features_ok(bench, feature_bit(VIRTIO_F_VERSION_1) | feature_bit(5))
    assert not status & STATUS_FEATURES_OK
    bench.set_reg(mmio.STATUS, 0)
    status = _to_features_ok(bench, feature_bit(VIRTIO_F_VERSION_1) | feature_bit(F_DEVICE_A))
    assert status & STATUS_FEATURES_OK
    assert bench.transport.negotiated_features == feature_bit(VIRTIO_F_VERSION_1) | feature_bit(F_DEVICE_A)


def test_driver_features_frozen_after_features_ok(bench: Bench) -> None:
    _to_features_ok(bench, feature_bit(VIRTIO_F_VERSION_1))
    bench.driver.write_features(feature_bit(VIRTIO_F_VERSION_1) | feature_bit(F_DEVICE_A))
    assert bench.transport.driver_features == feature_bit(VIRTIO_F_VERSION_1)
    bench.set_reg(mmio.DRIVER_FEATURES_SEL, 7)  # out of range selector: writes ignored
    bench.set_reg(mmio.DRIVER_FEATURES, 0xFFFF_FFFF)
    assert bench.transport.driver_features == feature_bit(VIRTIO_F_VERSION_1)


def test_driver_features_ignored_before_driver_bit(bench: Bench) -> None:
    bench.driver.write_features(feature_bit(VIRTIO_F_VERSION_1))
    assert bench.transport.driver_features == 0


# --- status state machine -------------------------------------------------------------------------

@pytest.mark.parametrize("value", [STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK,
                                   STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK])
def test_out_of_order_status_bits_ignored(bench: Bench, value: int) -> None:
    bench.set_reg(mmio.STATUS, value)
    assert bench.reg(mmio.STATUS) in (0, STATUS_ACKNOWLEDGE)
    assert bench.reg(mmio.STATUS) & ~STATUS_ACKNOWLEDGE == 0
    assert "activate" not in bench.device.calls


def test_driver_ok_without_features_ok_does_not_activate(bench: Bench) -> None:
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert bench.reg(mmio.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert "activate" not in bench.device.calls


def test_clearing_status_bits_is_ignored(bench: Bench) -> None:
    bench.driver.init()
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE)
    assert bench.reg(mmio.STATUS) == READY
    bench.set_reg(mmio.STATUS, READY | STATUS_DEVICE_NEEDS_RESET)  # the device's bit, not the driver's
    assert bench.reg(mmio.STATUS) == READY


def test_failed_bit(bench: Bench) -> None:
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE)
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE | STATUS_FAILED)
    assert bench.reg(mmio.STATUS) == STATUS_ACKNOWLEDGE | STATUS_FAILED


def test_reset_clears_everything(bench: Bench) -> None:
    bench.driver.init()
    q = bench.driver.queues[0]
    q.add_buffer([b"a"], [1])
    q.kick()
    assert bench.reg(mmio.INTERRUPT_STATUS)
    bench.set_reg(mmio.STATUS, 0)
    assert bench.reg(mmio.STATUS) == 0
    assert bench.reg(mmio.INTERRUPT_STATUS) == 0
    assert "reset" in bench.device.calls
    assert not any(queue.ready for queue in bench.transport.queues)
    bench.set_reg(mmio.QUEUE_SEL, 0)
    assert bench.reg(mmio.QUEUE_READY) == 0
    assert bench.transport.driver_features == 0
    bench.driver.init()  # and it comes back
    assert bench.reg(mmio.STATUS) == READY


# --- register access rules ------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 2, 3, 8])
def test_wrong_width_register_reads_give_zero(bench: Bench, length: int) -> None:
    assert bench.transport.read(mmio.MAGIC_VALUE, length) == bytes(length)
    assert bench.transport.read(mmio.DEVICE_ID, length) == bytes(length)


@pytest.mark.parametrize(("offset", "length"), [(0x001, 4), (0x002, 4), (0x071, 4), (-4, 4), (0x1000, 4),
                                                (0x10000, 4), (0x0, 0), (0x0, -1), (0x0, 16)])
def test_bad_reads_give_zero_or_nothing(bench: Bench, offset: int, length: int) -> None:
    data = bench.transport.read(offset, length)
    assert data == bytes(max(0, min(length, 8)))


def test_wrong_width_register_writes_are_ignored(bench: Bench) -> None:
    bench.transport.write(mmio.STATUS, b"\x01")
    bench.transport.write(mmio.STATUS, b"\x01\x00")
    bench.transport.write(mmio.STATUS, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    bench.transport.write(mmio.STATUS + 1, b"\x01\x00\x00\x00")
    assert bench.reg(mmio.STATUS) == 0
    bench.transport.write(mmio.STATUS, b"\x01\x00\x00\x00")
    assert bench.reg(mmio.STATUS) == STATUS_ACKNOWLEDGE


@pytest.mark.parametrize("offset", [0x018, 0x028, 0x03C, 0x040, 0x048, 0x058, 0x068, 0x0C4, 0x0F8, 0x1000, -8])
def test_unknown_registers(bench: Bench, offset: int) -> None:
    bench.driver.init()
    before = (bench.reg(mmio.STATUS), bench.transport.driver_features, bench.device.calls[:])
    bench.transport.write(offset, b"\xff\xff\xff\xff")
    assert bench.transport.read(offset, 4) == bytes(4)
    assert (bench.reg(mmio.STATUS), bench.transport.driver_features, bench.device.calls) == before


def test_read_only_registers_ignore_writes(bench: Bench) -> None:
    for offset in (mmio.MAGIC_VALUE, mmio.VERSION, mmio.DEVICE_ID, mmio.VENDOR_ID, mmio.QUEUE_NUM_MAX,
                   mmio.CONFIG_GENERATION, mmio.INTERRUPT_STATUS, mmio.QUEUE_RESET, mmio.SHM_LEN_LOW):
        before = bench.reg(offset)
        bench.set_reg(offset, 0x1234)
        assert bench.reg(offset) == before


# --- config space ---------------------------------------------------------------------------------

def test_config_space_widths(bench: Bench) -> None:
    for length in (1, 2, 4, 8):
        assert bench.transport.read(mmio.CONFIG + 2, length) == bytes(range(2, 2 + length))
    assert bench.transport.read(mmio.CONFIG + 2, 3) == bytes(3)
    assert bench.transport.read(mmio.CONFIG + 0xF00 - 4, 8) == bytes(8)  # runs past the window
    assert bench.transport.read(mmio.CONFIG + 14, 4) == b"\x0e\x0f\x00\x00"  # short device answer padded
    bench.transport.write(mmio.CONFIG + 4, b"\xaa\xbb")
    assert bench.device.config[4:6] == b"\xaa\xbb"
    bench.transport.write(mmio.CONFIG + 4, b"\x01\x02\x03")  # width 3: ignored
    assert bench.device.config[4:7] == b"\xaa\xbb\x06"


def test_config_generation_and_interrupt(bench: Bench) -> None:
    generation = bench.reg(mmio.CONFIG_GENERATION)
    bench.device.signal_config_change()  # before DRIVER_OK: generation moves, no interrupt
    assert bench.reg(mmio.CONFIG_GENERATION) == generation + 1
    assert bench.irqs == 0 and bench.reg(mmio.INTERRUPT_STATUS) == 0
    bench.driver.init()
    bench.device.signal_config_change()
    assert bench.reg(mmio.CONFIG_GENERATION) == generation + 2
    assert bench.irqs == 1
    assert bench.driver.ack_interrupt() == VIRTIO_MMIO_INT_CONFIG
    assert bench.driver.ack_interrupt() == 0


def test_config_read_retries_on_generation_change(bench: Bench) -> None:
    bench.driver.init()
    real = bench.device.read_config
    changes = [1]

    def changing(offset: int, length: int) -> bytes:
        if changes:
            changes.pop()
            bench.device.config[0:4] = b"NEW!"
            bench.device.signal_config_change()
        return real(offset, length)

    bench.device.read_config = changing  # type: ignore[method-assign]
    assert bench.driver.read_config(0, 8) == b"NEW!" + bytes(range(4, 8))
    assert bench.driver.read_config_u32(0) == struct.unpack("<I", b"NEW!")[0]
    assert bench.driver.read_config_u64(0) == struct.unpack("<Q", b"NEW!" + bytes(range(4, 8)))[0]


# --- queues ---------------------------------------------------------------------------------------

def _setup_until_features_ok(bench: Bench) -> None:
    bench.driver.init(driver_ok=False, queue_sizes=[0, 0])


def _program_queue(bench: Bench, index: int, size: int, desc: int = 0x10000, avail: int = 0x20000,
                   used: int = 0x30000) -> int:
    bench.set_reg(mmio.QUEUE_SEL, index)
    bench.set_reg(mmio.QUEUE_NUM, size)
    for low, addr in ((mmio.QUEUE_DESC_LOW, desc), (mmio.QUEUE_DRIVER_LOW, avail), (mmio.QUEUE_DEVICE_LOW, used)):
        bench.set_reg(low, addr & 0xFFFF_FFFF)
        bench.set_reg(low + 4, addr >> 32)
    bench.set_reg(mmio.QUEUE_READY, 1)
    return bench.reg(mmio.QUEUE_READY)


def test_queue_num_max(bench: Bench) -> None:
    for index, expected in ((0, 16), (1, 8), (2, 0), (0xFFFF_FFFF, 0)):
        bench.set_reg(mmio.QUEUE_SEL, index)
        assert bench.reg(mmio.QUEUE_NUM_MAX) == expected
        assert bench.reg(mmio.QUEUE_READY) == 0


@pytest.mark.parametrize("size", [0, 3, 24, 32, 0xFFFF_FFFF])
def test_bad_queue_sizes_refused(bench: Bench, size: int) -> None:
    _setup_until_features_ok(bench)
    assert _program_queue(bench, 0, size) == 0
    assert _program_queue(bench, 0, 16) == 1


@pytest.mark.parametrize(("desc", "avail", "used"), [
    (0x10008, 0x20000, 0x30000), (0x10000, 0x20001, 0x30000), (0x10000, 0x20000, 0x30002),
    (16 << 20, 0x20000, 0x30000), (0x10000, 2**64 - 64, 0x30000), (0x10000, 0x20000, (16 << 20) - 8),
    (1 << 32 | 0x10000, 0x20000, 0x30000),
])
def test_bad_queue_addresses_refused(bench: Bench, desc: int, avail: int, used: int) -> None:
    _setup_until_features_ok(bench)
    assert _program_queue(bench, 0, 16, desc, avail, used) == 0


def test_queue_addresses_read_back_and_frozen_while_ready(bench: Bench) -> None:
    _setup_until_features_ok(bench)
    assert _program_queue(bench, 1, 8, 0x10000, 0x20000, 0x30000) == 1
    bench.set_reg(mmio.QUEUE_DESC_LOW, 0x40000)
    bench.set_reg(mmio.QUEUE_NUM, 4)
    queue = bench.transport.queues[1]
    assert (queue.size, queue.desc_addr) == (8, 0x10000)
    assert bench.reg(mmio.QUEUE_DESC_LOW) == 0x10000 and bench.reg(mmio.QUEUE_DESC_HIGH) == 0
    assert bench.reg(mmio.QUEUE_DRIVER_LOW) == 0x20000 and bench.reg(mmio.QUEUE_DEVICE_LOW) == 0x30000
    bench.set_reg(mmio.QUEUE_READY, 0)
    assert bench.reg(mmio.QUEUE_READY) == 0 and not queue.ready


def test_queue_setup_before_features_ok_refused(bench: Bench) -> None:
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE)
    bench.set_reg(mmio.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    assert _program_queue(bench, 0, 16) == 0
    bench.set_reg(mmio.QUEUE_READY, 1)
    assert bench.reg(mmio.QUEUE_READY) == 0


def test_queue_setup_after_driver_ok_refused(bench: Bench) -> None:
    bench.driver.init(queue_sizes=[16, 0])
    assert _program_queue(bench, 1, 8) == 0


def test_ready_for_nonexistent_queue_ignored(bench: Bench) -> None:
    _setup_until_features_ok(bench)
    assert _program_queue(bench, 5, 8) == 0
    assert bench.reg(mmio.QUEUE_DESC_LOW) == 0


def test_notify_rules(bench: Bench) -> None:
    _setup_until_features_ok(bench)
    queue = bench.driver.setup_queue(0)
    queue.add_buffer([b"early"], [5])
    queue.kick()  # before DRIVER_OK: ignored
    assert not [c for c in bench.device.calls if c.startswith("notify")]
    bench.driver.add_status(STATUS_DRIVER_OK)
    for index in (1, 2, 0xFFFF, 0x7FFF_FFFF):  # not set up, nonexistent, huge
        bench.set_reg(mmio.QUEUE_NOTIFY, index)
    assert not [c for c in bench.device.calls if c.startswith("notify")]
    queue.kick()
    assert bench.device.calls[-1] == "notify0"
    assert [(h, n) for h, n, _ in queue.get_used()] == [(0, 5)]


def test_interrupts_before_driver_ok_are_not_raised(bench: Bench) -> None:
    bench.device.signal_used()
    assert bench.irqs == 0 and bench.reg(mmio.INTERRUPT_STATUS) == 0


def test_interrupt_ack_clears_only_acked_bits(bench: Bench) -> None:
    bench.driver.init()
    bench.device.signal_used()
    bench.device.signal_config_change()
    assert bench.reg(mmio.INTERRUPT_STATUS) == 3
    bench.set_reg(mmio.INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert bench.reg(mmio.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert bench.irqs == 2


def test_failing_raise_irq_is_contained(memory: GuestMemory) -> None:
    def broken() -> None:
        raise RuntimeError("no irqchip")

    device = EchoDevice()
    transport = VirtioMmioTransport(device, memory, broken)
    driver = VirtioDriver(memory, transport)
    driver.init()
    device.signal_used()
    device.report_failure(RuntimeError("worker"))
    assert driver.read_reg(mmio.INTERRUPT_STATUS) == 3


# --- device failures ------------------------------------------------------------------------------

def test_activate_failure_sets_needs_reset(bench: Bench, caplog: pytest.LogCaptureFixture) -> None:
    bench.device.fail.add("activate")
    with caplog.at_level(logging.ERROR, logger="memvisor.virtio.mmio"):
        bench.driver.init()
    assert bench.reg(mmio.STATUS) == READY | STATUS_DEVICE_NEEDS_RESET
    assert bench.reg(mmio.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    assert bench.irqs == 1
    assert not bench.transport.active
    assert "activate failed on purpose" in (bench.transport.last_error or "")
    bench.driver.queues[0].kick()  # a broken device gets no notifications
    assert "notify0" not in bench.device.calls
    bench.device.fail.clear()
    bench.driver.init()  # reset clears it
    assert bench.reg(mmio.STATUS) == READY


def test_notify_failure_keeps_transport_usable(bench: Bench, caplog: pytest.LogCaptureFixture) -> None:
    bench.driver.init()
    bench.device.fail.add("notify0")
    with caplog.at_level(logging.DEBUG, logger="memvisor.virtio.mmio"):
        bench.driver.queues[0].kick()
        bench.device.fail.add("read_config")
        assert bench.transport.read(mmio.CONFIG, 4) == bytes(4)
        bench.device.fail.add("write_config")
        bench.transport.write(mmio.CONFIG, b"\x00")
    assert bench.transport.errors == 3
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # logged once
    assert bench.reg(mmio.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert bench.reg(mmio.MAGIC_VALUE) == mmio.MAGIC


def test_device_features_failure(bench: Bench) -> None:
    bench.device.fail.add("device_features")
    assert bench.driver.device_features() == feature_bit(VIRTIO_F_VERSION_1) | feature_bit(
        VIRTIO_F_RING_INDIRECT_DESC) | feature_bit(VIRTIO_F_RING_EVENT_IDX)
    assert bench.transport.errors == 1


def test_reset_failure_is_contained(bench: Bench) -> None:
    bench.driver.init()
    bench.device.fail.add("reset")
    bench.set_reg(mmio.STATUS, 0)
    assert bench.reg(mmio.STATUS) == 0
    assert bench.transport.errors == 1


def test_report_failure_from_a_worker_thread(bench: Bench) -> None:
    bench.driver.init()
    worker = threading.Thread(target=bench.device.report_failure, args=(OSError("fsync failed"),))
    worker.start()
    worker.join()
    assert bench.reg(mmio.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert bench.irqs == 1


def test_transport_bug_is_contained(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> int:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(bench.transport, "_read_register", boom)
    monkeypatch.setattr(bench.transport, "_write_register", boom)
    assert bench.transport.read(mmio.STATUS, 4) == bytes(4)
    bench.transport.write(mmio.STATUS, b"\x01\x00\x00\x00")
    assert bench.transport.errors == 2


def test_unbound_device_signals_are_harmless() -> None:
    device = EchoDevice()
    device.signal_used()
    device.signal_config_change()
    device.report_failure(RuntimeError("nobody listens"))
    device.count("x", 3)
    assert device.counters == {"x": 3}


# --- property tests -------------------------------------------------------------------------------

_OFFSETS = st.one_of(st.sampled_from([0x0, 0x4, 0x8, 0xC, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50,
                                      0x60, 0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4, 0xAC, 0xB0, 0xC0,
                                      0xFC, 0x100, 0x104, 0x108]),
                     st.integers(-16, 0x1010))
_VALUES = st.one_of(st.integers(0, 0xFF), st.integers(0, 0xFFFF_FFFF),
                    st.sampled_from([1, 3, 7, 0xF, 16, 0x10000, 0x20000, 0x30000]))
_ACCESS = st.tuples(st.booleans(), _OFFSETS, st.sampled_from([1, 2, 4, 4, 4, 8, 3]), _VALUES)


@settings(max_examples=200, deadline=None)
@given(accesses=st.lists(_ACCESS, max_size=60), fail=st.sets(st.sampled_from(
    ["activate", "notify0", "notify1", "read_config", "write_config", "reset", "device_features"])),
    initialised=st.booleans(), garbage=st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=32)),
                                                max_size=8))
def test_random_register_traffic_never_raises(accesses: list[tuple[bool, int, int, int]], fail: set[str],
                                              initialised: bool, garbage: list[tuple[int, bytes]]) -> None:
    memory = _PROPERTY_MEMORY
    memory.write(0, bytes(0x8000))
    device = EchoDevice()
    device.fail = fail
    transport = VirtioMmioTransport(device, memory, lambda: None)
    if initialised and not fail:
        driver = VirtioDriver(memory, transport)
        driver.init()
        driver.queues[0].add_buffer([b"ok"], [2])
        for offset, data in garbage:  # the driver scribbles over its own rings and buffers
            memory.write(offset, data)
    failures: list[BaseException] = []
    real_failed = transport._device_failed

    def record(error: BaseException) -> None:
        failures.append(error)
        real_failed(error)

    transport._device_failed = record  # type: ignore[method-assign]
    for is_write, offset, width, value in accesses:
        if is_write:
            transport.write(offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))
        else:
            assert len(transport.read(offset, width)) == width
        status = transport.status
        if status & STATUS_DRIVER_OK:
            assert status & STATUS_FEATURES_OK
        if status & STATUS_FEATURES_OK:
            assert has_feature(transport.driver_features, VIRTIO_F_VERSION_1)
            assert not transport.driver_features & ~transport.offered_features()
        for queue in transport.queues:
            if queue.ready:
                assert queue.size & (queue.size - 1) == 0 and 1 <= queue.size <= queue.max_size
                assert memory.contains(queue.desc_addr, 16 * queue.size)
    # Only the device's own failures (told to fail, or refusing a hostile ring) may reach the catch-all.
    assert all(isinstance(e, VirtioDeviceError | VirtqueueError) for e in failures), failures


_PROPERTY_MEMORY = test_memory(1 << 20)
