"""virtio-console (single port) through the virtio-mmio transport and a driver writing real descriptors.

virtio 1.2 section 5.3: receiveq0 (queue 0) carries host bytes into device-writable guest buffers,
transmitq0 (queue 1) carries guest bytes out of device-readable buffers.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.console import ConsoleError, VirtioConsoleDevice
from memvisor.devices.console.device import (
    CONFIG,
    MAX_CHAIN_BYTES,
    QUEUE_SIZE,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_ID_CONSOLE,
)
from memvisor.virtio import mmio
from memvisor.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    VIRTIO_F_VERSION_1,
    VirtioDeviceError,
)
from memvisor.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from memvisor.virtio.testing import DriverQueue, VirtioDriver, attach
from memvisor.vmm.agent import ExecResult, GuestAgent

PAGE = 4096


class Rig:
    """A console device, its transport and an initialised driver; `received` is what reached the host."""

    def __init__(self, **init_options: Any) -> None:
        self.received = bytearray()
        self.device = VirtioConsoleDevice(self.received.extend)
        self.driver: VirtioDriver = attach(self.device, **init_options)

    @property
    def rx(self) -> DriverQueue:
        return self.driver.queue(RECEIVEQ)

    @property
    def tx(self) -> DriverQueue:
        return self.driver.queue(TRANSMITQ)

    def post_rx(self, *sizes: int, kick: bool = True) -> list[int]:
        heads = [self.rx.add_buffer([], [size]) for size in sizes]
        if kick:
            self.rx.kick()
        return heads

    def transmit(self, *pieces: bytes, indirect: bool = False) -> int:
        head = self.tx.add_buffer(list(pieces), [], indirect=indirect)
        self.tx.kick()
        return head

    @property
    def broken(self) -> bool:
        return bool(self.driver.status & STATUS_DEVICE_NEEDS_RESET)


def test_identity_features_and_queues() -> None:
    rig = Rig()
    assert rig.driver.read_reg(mmio.DEVICE_ID) == VIRTIO_ID_CONSOLE == 3
    offered = rig.driver.device_features()
    assert offered >> VIRTIO_F_VERSION_1 & 1
    assert offered & 0b111 == 0  # no SIZE, MULTIPORT or EMERG_WRITE: one port, nothing else
    assert rig.device.queue_max_sizes == (QUEUE_SIZE, QUEUE_SIZE)
    assert rig.driver.status & STATUS_DRIVER_OK and rig.device.active


def test_config_space_layout_and_emergency_write() -> None:
    rig = Rig()
    cols, rows, max_ports, emerg = CONFIG.unpack(rig.driver.read_config(0, CONFIG.size))
    assert (cols, rows, max_ports, emerg) == (80, 25, 1, 0)
    assert rig.device.read_config(2, 2) == rows.to_bytes(2, "little")
    assert rig.device.read_config(10, 8) == bytes(8)  # past the end: zeros
    assert rig.device.read_config(-1, 4) == bytes(4)
    rig.driver.write_config(8, (0x41).to_bytes(4, "little"))  # Linux: one character per 32-bit write
    rig.driver.write_config(8, b"B")
    rig.driver.write_config(0, b"\x10\x00")  # cols is read-only for the driver
    assert bytes(rig.received) == b"AB"
    assert CONFIG.unpack(rig.driver.read_config(0, CONFIG.size))[0] == 80
    assert rig.device.counters["tx_bytes"] == 2


def test_transmit_delivers_every_readable_byte_and_returns_the_buffer() -> None:
    rig = Rig()
    irqs = rig.driver.irq_count
    head = rig.transmit(b"hello ", b"world\n")
    assert bytes(rig.received) == b"hello world\n"
    assert rig.tx.get_used() == [(head, 0, b"")]
    assert rig.driver.irq_count == irqs + 1
    assert rig.device.counters["tx_bytes"] == 12 and rig.device.counters["tx_buffers"] == 1


def test_transmit_through_an_indirect_table_with_event_idx() -> None:
    rig = Rig(event_idx=True)
    for word in (b"one ", b"two ", b"three"):
        rig.transmit(word, indirect=True)
    assert bytes(rig.received) == b"one two three"
    assert len(rig.tx.get_used()) == 3


def test_send_fills_posted_buffers_in_order_and_signals() -> None:
    rig = Rig()
    rig.post_rx(8, 8, 8)
    irqs = rig.driver.irq_count
    rig.device.send(b"0123456789abcdefXY")
    used = rig.rx.get_used()
    assert [(written, data) for _, written, data in used] == [(8, b"01234567"), (8, b"89abcdef"), (2, b"XY")]
    assert rig.driver.irq_count == irqs + 1  # one interrupt for the batch
    assert rig.device.pending == 0 and rig.device.counters["rx_bytes"] == 18


def test_send_waits_for_buffers_and_keeps_order() -> None:
    rig = Rig()
    rig.device.send(b"first ")
    rig.device.send(b"second")
    rig.device.send(b"")
    assert rig.device.pending == 12 and rig.rx.get_used() == []
    rig.post_rx(4)
    rig.post_rx(PAGE)
    assert b"".join(data for _, _, data in rig.rx.get_used()) == b"first second"
    assert rig.device.pending == 0


def test_bytes_sent_before_the_driver_is_ready_arrive_after_activation() -> None:
    device = VirtioConsoleDevice(lambda data: None)
    device.send(b"early")
    assert not device.active and device.pending == 5
    driver = attach(device, driver_ok=False)
    rx = driver.queue(RECEIVEQ)
    rx.add_buffer([], [PAGE])
    driver.add_status(STATUS_DRIVER_OK)  # activation hands the early bytes to the posted buffer
    assert [data for _, _, data in rx.get_used()] == [b"early"]


def test_driver_ok_without_both_queues_marks_the_device_broken() -> None:
    device = VirtioConsoleDevice(lambda data: None)
    driver = attach(device, queue_sizes=[None, 0])
    assert driver.status & STATUS_DEVICE_NEEDS_RESET
    device.send(b"still fine")  # the host side never raises
    assert device.pending == 10


def test_reset_keeps_pending_host_bytes_for_the_next_driver() -> None:
    rig = Rig()
    rig.device.send(b"survives")
    rig.driver.write_reg(mmio.STATUS, 0)
    assert not rig.device.active
    rig.device.send(b" a reset")
    rig.driver.init()
    rig.post_rx(PAGE)
    assert [data for _, _, data in rig.rx.get_used()] == [b"survives a reset"]


def test_notify_before_activation_or_on_an_unknown_queue_does_nothing() -> None:
    device = VirtioConsoleDevice(lambda data: pytest.fail("no output expected"))
    device.notify(TRANSMITQ)
    rig = Rig()
    rig.device.notify(7)
    assert not rig.broken


# --- hostile drivers ----------------------------------------------------------------------------------


def test_transmit_chain_with_a_writable_buffer_is_returned_unused() -> None:
    rig = Rig()
    head = rig.tx.add_buffer([b"data"], [16])
    rig.tx.kick()
    assert rig.received == b"" and rig.tx.get_used() == [(head, 0, b"")]
    assert rig.device.counters["bad_chains"] == 1 and not rig.broken


def test_receive_chain_with_a_readable_buffer_is_returned_and_the_bytes_kept() -> None:
    rig = Rig()
    rig.device.send(b"keep me")
    head = rig.rx.add_buffer([b"junk"], [PAGE])
    rig.rx.kick()
    assert rig.rx.get_used() == [(head, 0, b"")]
    assert rig.device.pending == 7 and rig.device.counters["bad_chains"] == 1
    rig.post_rx(PAGE)
    assert [data for _, _, data in rig.rx.get_used()] == [b"keep me"]


def test_oversized_transmit_chain_is_cut_and_the_rest_counted() -> None:
    rig = Rig()
    big = bytes(range(256)) * (MAX_CHAIN_BYTES // 256 + 8)
    rig.transmit(big)
    assert bytes(rig.received) == big[:MAX_CHAIN_BYTES]
    assert rig.device.counters["dropped_bytes"] == len(big) - MAX_CHAIN_BYTES


@pytest.mark.parametrize("queue_index", [RECEIVEQ, TRANSMITQ])
def test_descriptor_loop_is_answered_without_raising(queue_index: int) -> None:
    rig = Rig()
    rig.device.send(b"x")  # so the receive queue pops too
    q = rig.driver.queue(queue_index)
    buf = rig.driver.allocator.alloc(16)
    flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if queue_index == RECEIVEQ else 0)
    q.write_desc(0, buf, 16, flags, next=0)
    q.publish(0)
    q.kick()
    assert rig.device.counters["bad_chains"] == 1 and not rig.broken
    assert rig.driver.memory.read_u16(q.used_addr + 2) == 1  # the head went back


@pytest.mark.parametrize("queue_index", [RECEIVEQ, TRANSMITQ])
def test_buffer_outside_guest_ram_is_answered(queue_index: int) -> None:
    rig = Rig()
    rig.device.send(b"x")
    q = rig.driver.queue(queue_index)
    q.write_desc(0, 1 << 40, 64, VIRTQ_DESC_F_WRITE if queue_index == RECEIVEQ else 0)
    q.publish(0)
    q.kick()
    assert rig.device.counters["bad_chains"] == 1 and not rig.broken
    assert rig.device.pending == 1


def test_available_index_far_ahead_marks_the_device_broken_and_send_stays_quiet() -> None:
    rig = Rig()
    rig.tx.set_avail_idx(1000)
    rig.tx.kick()
    assert rig.broken and not rig.device.active
    rig.rx.set_avail_idx(1000)
    rig.device.send(b"nobody listens")  # no exception, no queue touched
    rig.device.notify(RECEIVEQ)
    assert rig.device.pending == 14


def test_send_into_a_broken_ring_reports_the_failure() -> None:
    rig = Rig()
    rig.rx.set_avail_idx(1000)
    rig.device.send(b"boom")
    assert rig.broken and rig.driver.transport.errors == 1
    assert rig.device.pending == 4


def test_one_notify_takes_at_most_one_queue_worth_of_chains() -> None:
    rig = Rig(queue_sizes=[None, 8])
    tx = rig.tx
    buf = rig.driver.allocator.alloc(1)
    rig.driver.memory.write(buf, b"z")
    tx.write_desc(0, buf, 1, 0)
    for _ in range(8):
        tx.publish(0)  # the same head eight times: the ring allows it, each pop is bounded work
    tx.kick()
    assert bytes(rig.received) == b"z" * 8
    tx.publish(0)
    tx.kick()
    assert bytes(rig.received) == b"z" * 9 and not rig.broken


def test_output_that_sends_back_does_not_deadlock() -> None:
    driver_box: list[VirtioConsoleDevice] = []
    device = VirtioConsoleDevice(lambda data: driver_box[0].send(data.upper()))
    driver_box.append(device)
    driver = attach(device)
    driver.queue(RECEIVEQ).add_buffer([], [PAGE])
    driver.queue(RECEIVEQ).kick()
    driver.queue(TRANSMITQ).add_buffer([b"echo"], [])
    driver.queue(TRANSMITQ).kick()
    assert [data for _, _, data in driver.queue(RECEIVEQ).get_used()] == [b"ECHO"]


def test_console_error_is_a_virtio_device_error() -> None:
    assert issubclass(ConsoleError, VirtioDeviceError)


def test_sends_from_another_thread_arrive_complete_and_in_order() -> None:
    rig = Rig()
    chunks = [f"line {i:04d}\n".encode() for i in range(400)]
    done = threading.Event()

    def sender() -> None:
        for chunk in chunks:
            rig.device.send(chunk)
        done.set()

    thread = threading.Thread(target=sender)
    thread.start()
    got = bytearray()
    expected = b"".join(chunks)
    for _ in range(100_000):
        with rig.device.lock:  # driver-side bookkeeping; the device takes the same lock in send and notify
            got += b"".join(data for _, _, data in rig.rx.get_used())
            while rig.rx.outstanding < 4:
                rig.rx.add_buffer([], [64])
        rig.rx.kick()
        if len(got) >= len(expected) and done.is_set():
            break
    thread.join(10)
    assert bytes(got) == expected


# --- random buffers -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=12),
    st.booleans(),
)
def test_random_sends_and_receive_buffers_deliver_the_stream(
    sends: list[bytes], sizes: list[int], post_first: bool
) -> None:
    rig = Rig(event_idx=True)
    if post_first:
        rig.post_rx(*sizes)
    for data in sends:
        rig.device.send(data)
    if not post_first:
        rig.post_rx(*sizes)
    got = bytearray()
    for _ in range(200):
        used = rig.rx.get_used()
        for _, written, data in used:
            assert written > 0 and len(data) == written
            got += data
        if not rig.device.pending:
            break
        rig.post_rx(*sizes)
    expected = b"".join(sends)
    assert bytes(got) == expected
    assert rig.device.counters["rx_bytes"] == len(expected)
    assert not rig.broken


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.binary(min_size=0, max_size=200), min_size=1, max_size=4), min_size=1, max_size=10),
    st.booleans(),
)
def test_random_transmit_buffers_reach_the_host_in_order(chains: list[list[bytes]], indirect: bool) -> None:
    rig = Rig()
    for pieces in chains:
        rig.tx.add_buffer(pieces, [], indirect=indirect)
    rig.tx.kick()
    assert bytes(rig.received) == b"".join(b"".join(pieces) for pieces in chains)
    assert len(rig.tx.get_used()) == len(chains)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF),
                          st.integers(0, 0xFFFF)), min_size=1, max_size=16),
       st.integers(0, 0xFFFF), st.sampled_from([RECEIVEQ, TRANSMITQ]))
def test_random_descriptor_tables_never_raise(descs: list[tuple[int, int, int, int]], avail: int,
                                              queue_index: int) -> None:
    rig = Rig(queue_sizes=[16, 16])
    rig.device.send(b"pending bytes")
    q = rig.driver.queue(queue_index)
    for index, (addr, length, flags, next_index) in enumerate(descs):
        q.write_desc(index, addr, length, flags, next_index)
    for index in range(len(descs)):
        q.publish(index)
    if avail:
        q.set_avail_idx(avail)
    q.kick()  # the transport would turn an exception into NEEDS_RESET; the device must never hang either
    rig.device.send(b"more")
    q.kick()
    assert rig.driver.transport.errors <= 1
    assert rig.device.pending + rig.device.counters["rx_bytes"] == 17


# --- the guest agent over the console -----------------------------------------------------------------


def test_guest_agent_protocol_runs_over_the_console() -> None:
    """GuestAgent.send -> receiveq -> a fake guest agent -> transmitq -> GuestAgent.on_output."""
    agents: list[GuestAgent] = []
    device = VirtioConsoleDevice(lambda data: agents[0].on_output(data))
    agents.append(GuestAgent(device.send))
    driver = attach(device)
    rx, tx = driver.queue(RECEIVEQ), driver.queue(TRANSMITQ)
    with device.lock:
        for _ in range(4):
            rx.add_buffer([], [PAGE])
        rx.kick()
    tx.add_buffer([b"MVAGENT READY\n"], [])
    tx.kick()
    results: list[ExecResult] = []
    thread = threading.Thread(target=lambda: results.append(agents[0].exec("echo hi", timeout=10)))
    thread.start()
    line = b""
    deadline = time.monotonic() + 10
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        with device.lock:
            line += b"".join(data for _, _, data in rx.get_used())
        time.sleep(0.001)
    verb, ident, command = line.split()
    assert verb == b"RUN" and base64.b64decode(command) == b"echo hi"
    answer = ident + b" O " + base64.b64encode(b"hi\n") + b"\n" + ident + b" X 0\n"
    tx.add_buffer([answer[:10], answer[10:]], [])
    tx.kick()
    thread.join(10)
    assert results == [ExecResult(0, b"hi\n", b"")]
