"""memvisor.vmm.ioeventfd: virtio-mmio notifies through KVM_IOEVENTFD and interrupts through KVM_IRQFD, without KVM.

KVM is faked at the ioctl: memvisor.kvm.system.Vm builds the real structs, and FakeKvm decodes them and keeps
the registrations as KVM would (refusing a duplicate or an unknown removal). A guest's register write meets
`GuestBus` first, which does what KVM does with it: a 4-byte write matching a registered ioeventfd signals
that (real) eventfd and never reaches the VMM; anything else is an MMIO exit into the window. The device-event
thread is real and so are the eventfds; tests wait for it with `flush`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from memvisor.errors import MemvisorError, UsageError
from memvisor.kvm import ioctls, structs, system
from memvisor.kvm.ioctls import KvmIoctlError
from memvisor.kvm.system import Vm
from memvisor.memory.guest_memory import GuestMemory
from memvisor.virtio import mmio
from memvisor.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.queue import SplitVirtqueue
from memvisor.virtio.testing import VirtioDriver, test_memory
from memvisor.vmm import machine as machine_module
from memvisor.vmm.event_loop import take
from memvisor.vmm.ioeventfd import ENV, DeviceEvents, NotifyWindow, requested
from memvisor.vmm.machine import Machine

BASE = 0xD000_0000
GSI = 16
NOTIFY = BASE + mmio.QUEUE_NOTIFY


class FakeKvm:
    """KVM's side of KVM_CHECK_EXTENSION, KVM_IOEVENTFD and KVM_IRQFD, kept from the structs memvisor passes."""

    def __init__(self) -> None:
        self.capabilities = {ioctls.KVM_CAP_IOEVENTFD: 1, ioctls.KVM_CAP_IRQFD: 1}
        self.ioeventfds: dict[tuple[int, int, int | None], int] = {}  # (addr, len, datamatch) -> fd
        self.irqfds: dict[tuple[int, int], None] = {}  # (fd, gsi)
        self.requests: list[tuple[int, bytes]] = []  # every ioctl with its struct's bytes
        self.refuse: int | None = None  # an errno for every KVM_IOEVENTFD assignment

    def ioctl(self, fd: int, request: int, arg: Any = None) -> int:
        if request == ioctls.KVM_CHECK_EXTENSION:
            return self.capabilities.get(arg, 0)
        raw = bytes(arg)
        self.requests.append((request, raw))
        if request == ioctls.KVM_IOEVENTFD:
            return self._ioeventfd(structs.KvmIoeventfd.from_buffer_copy(raw))
        if request == ioctls.KVM_IRQFD:
            return self._irqfd(structs.KvmIrqfd.from_buffer_copy(raw))
        raise AssertionError(f"unexpected ioctl {request:#x}")

    def _ioeventfd(self, request: structs.KvmIoeventfd) -> int:
        known = structs.KVM_IOEVENTFD_FLAG_DATAMATCH | structs.KVM_IOEVENTFD_FLAG_DEASSIGN
        assert not request.flags & ~known, "MMIO only: no PIO or other flags"
        datamatch = request.datamatch if request.flags & structs.KVM_IOEVENTFD_FLAG_DATAMATCH else None
        key = (request.addr, request.len, datamatch)
        if request.flags & structs.KVM_IOEVENTFD_FLAG_DEASSIGN:
            if self.ioeventfds.get(key) != request.fd:
                raise KvmIoctlError(errno.ENOENT, "no such ioeventfd")
            del self.ioeventfds[key]
            return 0
        if self.refuse is not None:
            raise KvmIoctlError(self.refuse, os.strerror(self.refuse))
        if key in self.ioeventfds:
            raise KvmIoctlError(errno.EEXIST, "ioeventfd exists")
        self.ioeventfds[key] = request.fd
        return 0

    def _irqfd(self, request: structs.KvmIrqfd) -> int:
        assert request.resamplefd == 0
        key = (request.fd, request.gsi)
        if request.flags & structs.KVM_IRQFD_FLAG_DEASSIGN:
            del self.irqfds[key]
        else:
            assert request.flags == 0, "no resample fd: the lines are edge-triggered"
            self.irqfds[key] = None
        return 0

    def guest_write(self, address: int, data: bytes) -> bool:
        """True when an ioeventfd takes this write inside "KVM" (no exit); it signals the eventfd."""
        value = int.from_bytes(data, "little")
        fd = self.ioeventfds.get((address, len(data), value), self.ioeventfds.get((address, len(data), None)))
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True


class GuestBus:
    """The guest's view of one virtio-mmio window: writes meet KVM's ioeventfds first, the rest are MMIO exits.
    It stands where VirtioDriver expects its transport."""

    def __init__(self, kvm: FakeKvm, window: NotifyWindow) -> None:
        self.kvm = kvm
        self.window = window
        self.exits = 0

    @property
    def queues(self) -> list[SplitVirtqueue]:
        return self.window.transport.queues

    def read(self, offset: int, length: int) -> bytes:
        self.exits += 1
        return self.window.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self.kvm.guest_write(self.window.base + offset, data):
            return
        self.exits += 1
        self.window.write(offset, data)


class EchoDevice(VirtioDevice):
    """Two queues; queue 0 echoes each request reversed. Records every notify with its thread and whether the
    transport was active then (it must always be)."""

    device_id = 42
    queue_max_sizes = (16, 8)

    def __init__(self) -> None:
        super().__init__()
        self.notified: list[tuple[int, str]] = []
        self.active_at_notify: list[bool] = []
        self.transport: VirtioMmioTransport | None = None
        self.queues: list[SplitVirtqueue] = []
        self.memory: GuestMemory | None = None
        self.delay = 0.0

    def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def read_config(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        self.memory, self.queues = memory, queues

    def notify(self, queue_index: int) -> None:
        assert self.transport is not None and self.memory is not None
        self.active_at_notify.append(self.transport.active)
        self.notified.append((queue_index, threading.current_thread().name))
        if self.delay:
            time.sleep(self.delay)
        memory = self.memory

        def echo(chain: Any) -> int:
            return int(chain.write_all(memory, chain.read_all(memory, 4096)[::-1]))

        with self.lock:
            self.drain(self.queues[queue_index], echo)

    def reset(self) -> None:
        self.queues = []


class Bench:
    """A machine's worth of the fast path: FakeKvm, DeviceEvents over a real Vm object, one window and driver."""

    def __init__(self, kvm: FakeKvm, memory: GuestMemory, *, start: bool = True) -> None:
        self.kvm = kvm
        self.vm = Vm(cast(Any, None), 1000)
        self.events = DeviceEvents(self.vm)
        self.device = EchoDevice()
        self.raise_irq = self.events.interrupt(GSI)
        self.transport = VirtioMmioTransport(self.device, memory, self.raise_irq)
        self.device.transport = self.transport
        self.window = self.events.window(BASE, self.transport)
        self.bus = GuestBus(kvm, self.window)
        self.driver = VirtioDriver(memory, cast(VirtioMmioTransport, self.bus))
        if start:
            self.events.start()

    def irqs(self) -> int:
        """Interrupts raised through the irqfd since the last call (what KVM would read from it)."""
        fd = self.events.irqfds[GSI].fd
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def flush(self) -> None:
        assert self.events.flush(5)

    def notify_registrations(self) -> dict[tuple[int, int, int | None], int]:
        return {key: fd for key, fd in self.kvm.ioeventfds.items() if key[0] == NOTIFY}


@pytest.fixture
def kvm(monkeypatch: pytest.MonkeyPatch) -> FakeKvm:
    fake = FakeKvm()
    monkeypatch.setattr(system, "ioctl", fake.ioctl)
    return fake


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = test_memory()
    yield mem
    mem.close()


@pytest.fixture
def bench(kvm: FakeKvm, memory: GuestMemory) -> Iterator[Bench]:
    made = Bench(kvm, memory)
    yield made
    made.events.close()


# --- the switch and the ioctls ----------------------------------------------------------------------


def test_the_switch_is_off_unless_set_to_1() -> None:
    assert requested({}) is False
    assert requested({ENV: "0"}) is False
    assert requested({ENV: ""}) is False
    assert requested({ENV: "1"}) is True
    assert requested({ENV: " 1 "}) is True
    with pytest.raises(UsageError, match=f"{ENV}='yes' is not understood: give {ENV}=1"):
        requested({ENV: "yes"})


def test_vm_fills_kvm_ioeventfd_and_kvm_irqfd(kvm: FakeKvm) -> None:
    vm = Vm(cast(Any, None), 1000)
    vm.ioeventfd(7, NOTIFY, 4, 3)
    vm.ioeventfd(7, NOTIFY, 4, 3, deassign=True)
    vm.irqfd(9, GSI)
    vm.irqfd(9, GSI, deassign=True)
    (r1, assign), (r2, deassign), (r3, irq_on), (r4, irq_off) = kvm.requests
    assert r1 == r2 == ioctls.KVM_IOEVENTFD == 0x4040AE79  # _IOW(KVMIO, 0x79, 64 bytes)
    assert r3 == r4 == ioctls.KVM_IRQFD == 0x4020AE76  # _IOW(KVMIO, 0x76, 32 bytes)
    assert len(assign) == 64 and len(irq_on) == 32
    # struct kvm_ioeventfd: datamatch u64, addr u64, len u32, fd s32, flags u32, pad[36]
    assert assign[:28] == (3).to_bytes(8, "little") + NOTIFY.to_bytes(8, "little") + (4).to_bytes(
        4, "little"
    ) + (7).to_bytes(4, "little") + structs.KVM_IOEVENTFD_FLAG_DATAMATCH.to_bytes(4, "little")
    assert deassign[24:28] == (structs.KVM_IOEVENTFD_FLAG_DATAMATCH | structs.KVM_IOEVENTFD_FLAG_DEASSIGN).to_bytes(
        4, "little")  # fmt: skip
    assert assign[28:] == deassign[28:] == bytes(36)
    # struct kvm_irqfd: fd u32, gsi u32, flags u32, resamplefd u32, pad[16]
    assert irq_on == (9).to_bytes(4, "little") + GSI.to_bytes(4, "little") + bytes(24)
    assert irq_off[8:12] == structs.KVM_IRQFD_FLAG_DEASSIGN.to_bytes(4, "little")
    assert kvm.ioeventfds == {} and kvm.irqfds == {}


def test_ioeventfd_without_datamatch_matches_any_value(kvm: FakeKvm) -> None:
    Vm(cast(Any, None), 1000).ioeventfd(7, NOTIFY, 4, None)
    request = structs.KvmIoeventfd.from_buffer_copy(kvm.requests[0][1])
    assert request.flags == 0 and request.datamatch == 0
    assert ctypes.sizeof(request) == 64


@pytest.mark.parametrize("missing", ["KVM_CAP_IOEVENTFD", "KVM_CAP_IRQFD"])
def test_a_kvm_without_the_capabilities_is_a_clear_error(kvm: FakeKvm, missing: str) -> None:
    kvm.capabilities[getattr(ioctls, missing)] = 0
    with pytest.raises(
        MemvisorError, match=f"{ENV}=1 needs {missing}, which this KVM does not report: unset {ENV}"
    ):
        DeviceEvents(Vm(cast(Any, None), 1000))


# --- notifies -------------------------------------------------------------------------------------


def test_a_session_notifies_without_exits_on_the_device_thread(bench: Bench) -> None:
    bench.driver.init(driver_ok=False)
    assert bench.notify_registrations() == {}  # nothing before DRIVER_OK
    bench.driver.add_status(STATUS_DRIVER_OK)
    fds = bench.window.fds
    assert bench.notify_registrations() == {(NOTIFY, 4, 0): fds[0], (NOTIFY, 4, 1): fds[1]}
    assert list(bench.kvm.irqfds) == [(bench.events.irqfds[GSI].fd, GSI)]
    queue = bench.driver.queues[0]
    exits = bench.bus.exits
    head = queue.add_buffer([b"abc", b"def"], [6])
    queue.kick()
    assert bench.bus.exits == exits  # the notify stayed in "KVM"
    bench.flush()
    assert queue.get_used() == [(head, 6, b"fedcba")]
    assert bench.device.notified == [(0, "device-events")]
    assert bench.irqs() == 1  # through the irqfd
    assert bench.driver.ack_interrupt() == VIRTIO_MMIO_INT_VRING  # the status and ACK registers as before
    assert bench.driver.read_reg(mmio.INTERRUPT_STATUS) == 0
    assert bench.window.notifies == bench.events.notifies == 1


def test_notify_rules_are_those_of_the_exit_path(bench: Bench) -> None:
    """test_virtio_mmio.test_notify_rules, with the notifies going through the fast path."""
    driver = bench.driver
    driver.write_reg(mmio.STATUS, 0)
    driver.add_status(STATUS_ACKNOWLEDGE)
    driver.add_status(STATUS_DRIVER)
    driver.write_features(1 << VIRTIO_F_VERSION_1)
    driver.add_status(STATUS_FEATURES_OK)
    queue = driver.setup_queue(0)
    queue.add_buffer([b"early"], [5])
    exits = bench.bus.exits
    queue.kick()  # before DRIVER_OK: an exit, ignored
    assert bench.bus.exits == exits + 1
    driver.add_status(STATUS_DRIVER_OK)
    for index in (1, 2, 0xFFFF, 0x7FFF_FFFF):  # not set up (its eventfd fires), nonexistent, huge (exits)
        driver.write_reg(mmio.QUEUE_NOTIFY, index)
    bench.transport.write(mmio.QUEUE_NOTIFY, b"\0\0")  # a 2-byte write never matches: an exit, ignored
    bench.flush()
    assert bench.device.notified == []
    queue.kick()
    bench.flush()
    assert bench.device.notified == [(0, "device-events")]
    assert [(h, n) for h, n, _ in queue.get_used()] == [(0, 5)]


def test_reset_removes_the_ioeventfds_and_drops_a_pending_notify(bench: Bench) -> None:
    bench.driver.init()
    assert len(bench.notify_registrations()) == 2
    queue = bench.driver.queues[0]
    queue.add_buffer([b"x"], [1])
    with bench.transport.lock:  # the device thread cannot run the notify before the reset
        queue.kick()
        bench.driver.write_reg(mmio.STATUS, 0)
    assert bench.notify_registrations() == {}
    bench.flush()
    assert bench.device.notified == []
    assert not any(take(fd) for fd in bench.window.fds)
    exits = bench.bus.exits
    bench.driver.write_reg(mmio.QUEUE_NOTIFY, 0)  # after the reset: an exit, ignored
    assert bench.bus.exits == exits + 1 and bench.device.notified == []
    bench.driver.init()  # a new driver gets them back
    assert len(bench.notify_registrations()) == 2
    queue = bench.driver.queues[0]
    head = queue.add_buffer([b"ok"], [2])
    queue.kick()
    bench.flush()
    assert queue.get_used() == [(head, 2, b"ko")]


def test_a_failed_device_gets_no_notifies(bench: Bench) -> None:
    bench.driver.init()
    bench.device.report_failure(RuntimeError("worker died"))
    assert bench.irqs() == 1  # the configuration interrupt, through the irqfd
    queue = bench.driver.queues[0]
    queue.add_buffer([b"x"], [1])
    queue.kick()
    bench.flush()
    assert bench.device.notified == []


def test_a_restored_transport_is_registered_when_the_machine_starts(
    kvm: FakeKvm, memory: GuestMemory
) -> None:
    bench = Bench(kvm, memory, start=False)
    try:
        with bench.transport.lock:  # what memvisor.virtio.state.restore_transport does
            bench.transport.load_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                                        False)  # fmt: skip
        assert bench.notify_registrations() == {}
        bench.events.start()
        assert len(bench.notify_registrations()) == 2
    finally:
        bench.events.close()


def test_close_removes_every_registration_and_closes_the_fds(kvm: FakeKvm, memory: GuestMemory) -> None:
    bench = Bench(kvm, memory)
    bench.driver.init()
    fds = [*bench.window.fds, bench.events.irqfds[GSI].fd]
    thread = bench.events.loop.thread
    bench.events.close()
    assert kvm.ioeventfds == {} and kvm.irqfds == {}
    assert thread is not None and not thread.is_alive()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    bench.raise_irq()  # a device worker raising after the machine closed: dropped, never a write to a stale fd
    bench.window.sync()
    assert kvm.ioeventfds == {}
    bench.events.close()  # twice is harmless


def test_a_refused_ioeventfd_leaves_that_queue_on_the_exit_path(kvm: FakeKvm, memory: GuestMemory,
                                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    kvm.refuse = errno.ENOSPC
    bench = Bench(kvm, memory)
    try:
        with caplog.at_level(logging.WARNING, logger="memvisor.vmm.ioeventfd"):
            bench.driver.init()
        assert "registering its ioeventfd failed" in caplog.text
        assert bench.window.assigned == (False, False)
        queue = bench.driver.queues[0]
        head = queue.add_buffer([b"ab"], [2])
        exits = bench.bus.exits
        queue.kick()  # an exit, served at once on this thread
        assert bench.bus.exits == exits + 1
        assert queue.get_used() == [(head, 2, b"ba")]
        assert bench.device.notified == [(0, threading.current_thread().name)]
        bench.driver.write_reg(mmio.STATUS, 0)  # nothing to remove
    finally:
        bench.events.close()


def test_notifies_racing_resets_never_reach_an_inactive_device(bench: Bench) -> None:
    """A guest kicking from one vCPU while another resets and re-initialises the device over and over."""
    bench.driver.init()
    stop = threading.Event()
    kicks = 0

    def kicker() -> None:
        nonlocal kicks
        while not stop.is_set():
            bench.bus.write(mmio.QUEUE_NOTIFY, (0).to_bytes(4, "little"))
            kicks += 1

    thread = threading.Thread(target=kicker)
    thread.start()
    try:
        for _ in range(30):
            bench.driver.write_reg(mmio.STATUS, 0)
            bench.driver.init()
    finally:
        stop.set()
        thread.join()
    bench.flush()
    assert kicks > 0
    assert all(bench.device.active_at_notify)
    assert len(bench.notify_registrations()) == 2


# --- the machine ------------------------------------------------------------------------------------


def _machine_shell() -> Machine:
    """A Machine without KVM and without vCPUs: what pause and the virtio plumbing use."""
    machine = Machine.__new__(Machine)
    machine._done = threading.Condition()
    machine._threads = []
    machine._stopping = False
    machine._pause_requested = False
    machine._held = False
    machine._parked = 0
    machine.vcpus = []
    machine.mmio = []
    return machine


def test_without_the_switch_the_machine_is_built_as_before() -> None:
    machine = _machine_shell()
    assert machine.device_events is None
    interrupt = machine.virtio_interrupt(GSI)
    assert isinstance(interrupt, functools.partial)
    assert interrupt.func == machine.pulse_irq and interrupt.args == (GSI,)
    transport = cast(VirtioMmioTransport, object())
    machine.add_virtio_window(BASE, transport)
    assert machine.mmio == [(BASE, mmio.MMIO_WINDOW_SIZE, transport)]  # the transport itself, as before


def test_with_the_switch_the_machine_uses_irqfds_and_windows(bench: Bench) -> None:
    machine = _machine_shell()
    machine.device_events = bench.events
    assert machine.virtio_interrupt(GSI) == bench.events.irqfds[GSI].raise_irq
    machine.add_virtio_window(BASE + 0x1000, bench.transport)
    ((base, size, window),) = machine.mmio
    assert (base, size) == (BASE + 0x1000, mmio.MMIO_WINDOW_SIZE)
    assert isinstance(window, NotifyWindow) and window.transport is bench.transport


def test_pause_returns_after_the_notifies_made_before_it(bench: Bench) -> None:
    machine = _machine_shell()
    machine.device_events = bench.events
    bench.driver.init()
    bench.device.delay = 0.3
    queue = bench.driver.queues[0]
    head = queue.add_buffer([b"snap"], [4])
    queue.kick()  # pending in its eventfd when the (parked) vCPUs are paused
    assert machine.pause(5)
    assert queue.get_used() == [(head, 4, b"pans")]  # a snapshot taken now sees it answered


def test_the_machine_module_reads_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1")
    assert machine_module.requested()
    monkeypatch.delenv(ENV)
    assert not machine_module.requested()
