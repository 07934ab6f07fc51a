"""The exit trail: a triple fault's report names where the vCPU was at its previous exit (issue 13).

A fake kvm_run page (a ctypes buffer laid out as linux/kvm.h says) stands in for KVM: the tests write an exit and
its sync regs into it as KVM would, then the reset state KVM leaves at KVM_EXIT_SHUTDOWN on AMD, and check that the
position reported is the one from before.
"""

import ctypes

from memvisor.kvm import structs
from memvisor.vmm.exit_trail import IMAGE_SIZE, SYNC_CLASSES, ExitTrail, RunImage, describe_events

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
