"""The exit trail: a triple fault's report names where the vCPU was at its previous exit (issue 13).

A fake kvm_run page (a ctypes buffer laid out as linux/kvm.h says) stands in for KVM: the tests write an exit and
its sync regs into it as KVM would, then the reset state KVM leaves at KVM_EXIT_SHUTDOWN on AMD, and check that the
position reported is the one from before.
"""

import collections
import ctypes
import errno
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from memvisor.kvm import structs
from memvisor.kvm.ioctls import KvmIoctlError
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.vmm import machine as machine_module
from memvisor.vmm import session
from memvisor.vmm.console import Console
from memvisor.vmm.exit_trail import (
    IMAGE_SIZE,
    SYNC_CLASSES,
    ExitTrail,
    RunImage,
    describe_events,
    page_walk_lines,
)
from memvisor.vmm.machine import Machine, Outcome, StopReason

PAGE = 4096
GUEST_RIP = 0xFFFFFFFF81A2B3C4
GUEST_CR3 = 0x10A3E000
GUEST_CR0 = 0x80050033


class FakeRunPage:
    """A kvm_run page: the head, kvm_valid_regs/kvm_dirty_regs and the sync regs, at linux/kvm.h's offsets."""

    def __init__(self) -> None:
        self.buffer = (ctypes.c_uint8 * PAGE)()
        self.address = ctypes.addressof(self.buffer)
        self.image = RunImage.from_address(self.address)

    def io_exit(self, port: int, rip: int, cr3: int, cr0: int) -> None:
        """What KVM leaves after an OUT to `port` with KVM_SYNC_X86_REGS|SREGS|EVENTS valid."""
        run, sync = self.image.run, self.image.sync
        run.exit_reason = structs.KVM_EXIT_IO
        run.exit.io.direction, run.exit.io.size, run.exit.io.port, run.exit.io.count = 1, 1, port, 1
        run.exit.io.data_offset = PAGE // 2
        sync.regs.rip, sync.regs.rsp = rip, 0xFFFFC90000013E58
        sync.sregs.cr0, sync.sregs.cr3, sync.sregs.cr2, sync.sregs.cs.selector = cr0, cr3, 0x7F00DEAD000, 0x10

    def shutdown_exit(self) -> None:
        """KVM_EXIT_SHUTDOWN on AMD: the VMCB was reinitialised, the sync regs hold the reset state."""
        run, sync = self.image.run, self.image.sync
        run.exit_reason = structs.KVM_EXIT_SHUTDOWN
        ctypes.memset(ctypes.addressof(sync), 0, ctypes.sizeof(sync))
        sync.regs.rip, sync.sregs.cs.selector, sync.sregs.cr0 = 0xFFF0, 0xF000, 0x10


def test_run_image_is_kvm_run_up_to_the_end_of_the_sync_regs() -> None:
    assert RunImage.run.offset == 0
    assert RunImage.valid_regs.offset == structs.RUN_SYNC_OFFSET
    assert RunImage.sync.offset == structs.RUN_SYNC_OFFSET + structs.KvmRunSync.s.offset == 0x130
    assert 0x130 + ctypes.sizeof(structs.KvmSyncRegs) == IMAGE_SIZE
    assert SYNC_CLASSES == structs.KVM_SYNC_X86_VALID_FIELDS == 7


def test_the_trail_reports_the_previous_exit_not_the_reset_state() -> None:
    page = FakeRunPage()
    trail = ExitTrail(page.address, SYNC_CLASSES)
    assert trail.describe() is None  # nothing recorded yet
    page.io_exit(0x3F8, GUEST_RIP, GUEST_CR3, GUEST_CR0)
    page.image.sync.events.exception.injected, page.image.sync.events.exception.nr = 1, 14
    page.image.sync.events.exception.has_error_code, page.image.sync.events.exception.error_code = 1, 2
    trail.record()
    page.shutdown_exit()  # KVM overwrites the page at the shutdown exit
    text = trail.describe(now_ns=trail.at_ns + 3_400_000)
    assert text is not None
    assert text.startswith("IO port 0x3f8 out (size 1, count 1) at rip=0xffffffff81a2b3c4 rsp=0xffffc90000013e58")
    assert f"cr0={GUEST_CR0:#x}" in text and f"cr3={GUEST_CR3:#x}" in text and "cr2=0x7f00dead000" in text
    assert "exception 14 injected error code 0x2" in text
    assert text.endswith("(3.4 ms earlier)")
    assert "0xfff0 " not in text and "cs=0xf000" not in text


def test_the_trail_names_only_the_register_classes_kvm_fills() -> None:
    page = FakeRunPage()
    page.io_exit(0x80, GUEST_RIP, GUEST_CR3, GUEST_CR0)
    trail = ExitTrail(page.address, structs.KVM_SYNC_X86_REGS)
    trail.record()
    text = trail.describe()
    assert text is not None and f"rip={GUEST_RIP:#x}" in text and "cr3" not in text


def test_mmio_and_other_exits_are_named() -> None:
    page = FakeRunPage()
    trail = ExitTrail(page.address, 0)
    page.image.run.exit_reason = structs.KVM_EXIT_MMIO
    page.image.run.exit.mmio.phys_addr, page.image.run.exit.mmio.len, page.image.run.exit.mmio.is_write = (
        0xD0000050, 4, 1)  # fmt: skip
    trail.record()
    assert (trail.describe() or "").startswith("MMIO write at 0xd0000050 (len 4) (")
    page.image.run.exit_reason = 99  # an exit memvisor has no name for: a number, still no crash
    trail.record()
    assert (trail.describe() or "").startswith("KVM exit 99 (")


def test_events_say_nothing_when_nothing_is_in_flight() -> None:
    events = structs.KvmVcpuEvents()
    assert describe_events(events) == ""
    events.nmi.pending, events.interrupt.injected, events.interrupt.nr = 1, 1, 0xEC
    assert describe_events(events) == "interrupt 236 injected, NMI pending"


# --- the vCPU loop with a fake vCPU over a fake kvm_run page ----------------------------------------------------


class FakeVcpu:
    """Makes the exits in `script` (callables that fill the page, returning the exit reason), then stops."""

    def __init__(self, script: list[Any], sync_regs: bool) -> None:
        self.index = 0
        self.page = FakeRunPage()
        self.run_address = self.page.address
        self.run_struct = self.page.image.run
        self.script = list(script)
        self.sync_regs = sync_regs

    def enable_sync_regs(self, classes: int) -> int:
        if not self.sync_regs:
            return 0  # no KVM_CAP_SYNC_REGS
        self.page.image.valid_regs = classes
        return classes

    def run(self) -> int:
        if self.run_struct.immediate_exit or not self.script:
            return structs.KVM_EXIT_INTR
        return int(self.script.pop(0)(self.page))

    def io_data(self, size: int) -> ctypes.Array:  # type: ignore[type-arg]
        return (ctypes.c_uint8 * size).from_address(self.run_address + PAGE // 2)

    def get_regs(self) -> structs.KvmRegs:
        raise KvmIoctlError(errno.EBADF, "fake vCPU")

    get_sregs = get_regs


def _out(port: int, rip: int) -> Any:
    def exit_(page: FakeRunPage) -> int:
        page.io_exit(port, rip, GUEST_CR3, GUEST_CR0)
        return structs.KVM_EXIT_IO

    return exit_


def _shutdown(page: FakeRunPage) -> int:
    page.shutdown_exit()
    return structs.KVM_EXIT_SHUTDOWN


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)


def _run_machine(vcpu: FakeVcpu, console_fd: int, console_text: bytes = b"", memory: GuestMemory | None = None
                 ) -> Outcome:  # fmt: skip
    machine = Machine.__new__(Machine)
    machine.memory = memory if memory is not None else GuestMemory()
    machine._done = threading.Condition()
    machine._threads, machine._stopping, machine._pause_requested, machine._parked = [], False, False, 0
    machine._held = False
    machine._outcome, machine._outcome_listeners = None, []
    machine._vcpu_states, machine._trails, machine._before_first_run = {}, {}, []
    machine.exit_counts = collections.Counter()
    machine.ports = machine_module.PortBus()
    machine.mmio = []
    machine.agent = cast(Any, SimpleNamespace(abort=lambda message: None))
    machine.console = Console(console_fd, lambda message: None)
    machine.console.write(console_text)
    machine.vcpus = cast(Any, [vcpu])
    previous = signal.getsignal(machine_module.KICK_SIGNAL)
    try:
        machine.start()
        outcome = machine.wait(timeout=5)
    finally:
        machine.stop("test over")
        machine.wait(timeout=5)
        signal.signal(machine_module.KICK_SIGNAL, previous)
    assert outcome is not None
    assert vcpu.page.image.dirty_regs == 0  # memvisor never asks KVM to load registers from kvm_run
    return outcome


def test_a_triple_fault_names_the_vcpus_last_position_and_the_console(devnull: int) -> None:
    console = b"".join(b"line %d\r\n" % number for number in range(30)) + b"\x1b[1mBUG: bad page\r\n"
    vcpu = FakeVcpu([_out(0x80, 0xFFFFFFFF81000010), _out(0x3F8, GUEST_RIP), _shutdown], sync_regs=True)
    outcome = _run_machine(vcpu, devnull, console)
    assert outcome.reason is StopReason.RESET
    assert outcome.cause.startswith(
        "triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN); its last exit before it: IO port 0x3f8 out (size 1, count 1) "
        f"at rip={GUEST_RIP:#x} "
    )
    assert f"cr3={GUEST_CR3:#x}" in outcome.cause and " ms earlier)" in outcome.cause
    assert "rip=0xfff0" not in outcome.cause
    assert len(outcome.console_tail) == 20
    assert outcome.console_tail[-1] == "?[1mBUG: bad page"  # the escape is not passed on to a terminal
    assert outcome.console_tail[0] == "line 11"


def test_a_triple_fault_walks_the_page_tables_of_its_last_cr3(devnull: int) -> None:
    from tests.unit.test_page_walk import CR4, EFER, Tables

    with GuestMemory([MemoryRegion.memfd(0, 64 << 20, "ram0")]) as memory:
        tables = Tables(memory)
        tables.map(GUEST_RIP & ~0xFFF, 0x2A00000)
        pd = tables.map(0xFFFFC90000013000, 0x2B00000)[2]
        memory.discard(pd, PAGE)  # the stack's PD page reads as zeros now

        def out_in_long_mode(page: FakeRunPage) -> int:
            page.io_exit(0x3F8, GUEST_RIP, tables.cr3, GUEST_CR0)
            page.image.sync.sregs.cr4, page.image.sync.sregs.efer = CR4, EFER
            return structs.KVM_EXIT_IO

        outcome = _run_machine(FakeVcpu([out_in_long_mode, _shutdown], sync_regs=True), devnull, memory=memory)
    assert outcome.reason is StopReason.RESET
    walk = outcome.page_walk
    assert re.fullmatch(rf"page walk at monotonic \d+ ns from cr3={tables.cr3:#x} \(4-level paging\), the tables as "
                        "they read now:", walk[0])  # fmt: skip
    assert int(walk[0].split()[4]) <= time.monotonic_ns()
    assert (f"rip {GUEST_RIP:#x}: maps to gpa {0x2A00000 | GUEST_RIP & 0xFFF:#x}; that page reads ALL ZEROS (host page: "
            "hole)") in walk  # fmt: skip
    assert any(line.endswith("NOT PRESENT, table page ALL ZEROS (host page: hole)") for line in walk)
    assert "rsp 0xffffc90000013e58: NOT PRESENT at the PD" in walk
    assert walk[-1] == f"page walk: table pages that read ALL ZEROS: {pd:#x}"
    assert "IDT #PF gate (vector 14): beyond the IDT limit 0x0" in walk  # the fake's IDT is empty


def test_without_sync_regs_the_cause_is_as_before(devnull: int) -> None:
    vcpu = FakeVcpu([_out(0x3F8, GUEST_RIP), _shutdown], sync_regs=False)
    outcome = _run_machine(vcpu, devnull)
    assert outcome.reason is StopReason.RESET
    assert outcome.cause == "triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN)"
    assert outcome.page_walk == ()


def test_the_reset_report_prints_the_cause_and_the_console_tail(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = Outcome(StopReason.RESET, "the guest rebooted", "triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN); its "
                      "last exit before it: HLT at rip=0x1", ("[  9.1] virtio_mem: plugged", "x"),
                      ("page walk from cr3=0x1000 (4-level paging), the tables as they read now:", "rip 0x1: ..."))  # fmt: skip
    machine = SimpleNamespace(outcome=outcome, vcpu_states=lambda: ["vCPU 0: rip=0xfff0"])
    session._report_reset(cast(Any, machine), 2)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "memvisor: the guest reset: triple fault on vCPU 0 (KVM_EXIT_SHUTDOWN); its last exit before it: HLT at "
        "rip=0x1",
        "memvisor:   vCPU 0: rip=0xfff0",
        "memvisor:   page walk from cr3=0x1000 (4-level paging), the tables as they read now:",
        "memvisor:   rip 0x1: ...",
        "memvisor:   the guest console's last lines before it:",
        "memvisor:   | [  9.1] virtio_mem: plugged",
        "memvisor:   | x",
    ]


def test_console_tail_keeps_the_unfinished_line(devnull: int) -> None:
    console = Console(devnull, lambda message: None)
    console.write(b"a\nb\r\nc")
    assert console.tail(20) == ("a", "b", "c")
    assert console.tail(1) == ("c",)


# --- Vcpu.enable_sync_regs: KVM_CHECK_EXTENSION first, kvm_valid_regs only --------------------------------------


@pytest.mark.parametrize(("supported", "enabled"), [(7, 7), (3, 3), (0, 0), (None, 0)])
def test_enable_sync_regs_asks_kvm_and_never_sets_dirty_bits(
    monkeypatch: pytest.MonkeyPatch, supported: int | None, enabled: int
) -> None:
    from memvisor.kvm import ioctls, system

    asked: list[tuple[int, int, object]] = []

    def fake_ioctl(fd: int, request: int, arg: object = None) -> int:
        asked.append((fd, request, arg))
        if supported is None:
            raise KvmIoctlError(errno.EINVAL, "an old KVM")
        return supported

    monkeypatch.setattr(system, "ioctl", fake_ioctl)
    page = FakeRunPage()
    vcpu = system.Vcpu.__new__(system.Vcpu)
    vcpu.vm = cast(Any, SimpleNamespace(kvm=SimpleNamespace(fd=42)))
    vcpu.run_address = page.address
    assert vcpu.enable_sync_regs(SYNC_CLASSES) == enabled
    assert asked == [(42, ioctls.KVM_CHECK_EXTENSION, ioctls.KVM_CAP_SYNC_REGS)]
    assert page.image.valid_regs == enabled
    assert page.image.dirty_regs == 0


def test_the_walk_covers_the_other_vcpus_last_rips_and_never_raises() -> None:
    from tests.unit.test_page_walk import CR4, EFER, Tables

    with GuestMemory([MemoryRegion.memfd(0, 64 << 20, "ram0")]) as memory:
        tables = Tables(memory)
        tables.map(GUEST_RIP & ~0xFFF, 0x2A00000)
        pages, trails = [FakeRunPage(), FakeRunPage()], {}
        for index, (page, rip) in enumerate(zip(pages, (GUEST_RIP, 0xFFFFFFFFC0421000), strict=True)):
            page.io_exit(0x3F8, rip, tables.cr3, GUEST_CR0)
            page.image.sync.sregs.cr4, page.image.sync.sregs.efer = CR4, EFER
            trails[index] = ExitTrail(page.address, SYNC_CLASSES)
            trails[index].record()
        lines = page_walk_lines(memory, trails[0], trails)
        assert "vCPU 1's last rip 0xffffffffc0421000: NOT PRESENT at the PDPT" in lines
        assert not any(line.startswith("vCPU 0's") for line in lines)  # the faulting vCPU's own is "rip"

        class Broken:
            def read(self, gpa: int, length: int) -> bytes:
                raise RuntimeError("a bug in a reader")

        assert page_walk_lines(Broken(), trails[0]) == ("page walk failed: RuntimeError: a bug in a reader",)
        assert page_walk_lines(memory, ExitTrail(pages[0].address, SYNC_CLASSES)) == ()  # nothing recorded yet
        registers_only = ExitTrail(pages[0].address, structs.KVM_SYNC_X86_REGS)
        registers_only.record()
        assert page_walk_lines(memory, registers_only) == ()  # no CR3 without the special registers
