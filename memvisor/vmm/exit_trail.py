"""Where a vCPU last was: a copy of its previous exit, so a triple fault can name the guest's last known position.

A triple fault ends KVM_RUN with KVM_EXIT_SHUTDOWN. On AMD, KVM's shutdown intercept reinitialises the VMCB
before returning, so the registers read after that exit are already the reset state (rip=0xfff0, cs=0xf000,
cr0=0x10): the evidence is gone. With KVM_CAP_SYNC_REGS and kvm_run.kvm_valid_regs set, KVM stores the
registers, the special registers and the pending events into kvm_run.s.regs at every exit, at no extra ioctl
(struct kvm_sync_regs, arch/x86/include/uapi/asm/kvm.h; Documentation/virt/kvm/api.rst, "kvm_valid_regs").
The vCPU loop copies the head of kvm_run (the exit reason and its exit union) and the sync regs into an
`ExitTrail` with one memmove before it enters the guest again, so when the shutdown exit arrives the trail still
holds the exit before it: its reason, RIP, RSP, CR0, CR2, CR3, any exception in flight, and when it happened.

The copy costs one memoryview slice assignment (about 70 ns; ctypes.memmove costs 650 ns for the same bytes) and
one clock read per exit: benchmarks/exit_trail.py times the vCPU loop with and without it.
Everything in the copy is guest-controlled: it is only formatted as numbers, never acted on.
"""

import ctypes
import time
from typing import TYPE_CHECKING

from memvisor.kvm import structs

if TYPE_CHECKING:
    from memvisor.vmm import page_walk  # imported when a triple fault needs it: not on every start

SYNC_CLASSES = structs.KVM_SYNC_X86_REGS | structs.KVM_SYNC_X86_SREGS | structs.KVM_SYNC_X86_EVENTS


class RunImage(ctypes.Structure):
    """kvm_run from its start through the sync regs (linux/kvm.h): what one exit left there."""

    _fields_ = [("run", structs.KvmRun), ("valid_regs", structs.u64), ("dirty_regs", structs.u64),
                ("sync", structs.KvmSyncRegs)]  # fmt: skip


IMAGE_SIZE = ctypes.sizeof(RunImage)

_EXIT_NAMES = {
    structs.KVM_EXIT_HLT: "HLT",
    structs.KVM_EXIT_INTR: "an interrupted KVM_RUN (KVM_EXIT_INTR)",
    structs.KVM_EXIT_SHUTDOWN: "KVM_EXIT_SHUTDOWN",
    structs.KVM_EXIT_SYSTEM_EVENT: "a system event",
    structs.KVM_EXIT_INTERNAL_ERROR: "a KVM internal error",
}


class ExitTrail:
    """One vCPU's previous exit. The vCPU loop calls `record()` (or its inlined equivalent:
    `view[:] = source`, then `at_ns = time.monotonic_ns()`) after handling each exit.

    `source` views the vCPU's kvm_run page by address (no buffer export: the page's mmap can still be closed);
    use it only while the vCPU is open, as the vCPU loop does."""

    __slots__ = ("image", "view", "source", "at_ns", "classes")

    def __init__(self, run_address: int, classes: int) -> None:
        self.image = RunImage()
        self.view = memoryview(self.image).cast("B")
        self.source = memoryview((ctypes.c_uint8 * IMAGE_SIZE).from_address(run_address)).cast("B")
        self.at_ns = 0  # 0: no exit recorded yet
        self.classes = classes  # the KVM_SYNC_X86_* classes KVM fills (from Vcpu.enable_sync_regs)

    def record(self) -> None:
        self.view[:] = self.source
        self.at_ns = time.monotonic_ns()

    def describe(self, now_ns: int | None = None) -> str | None:
        """The previous exit in one phrase, e.g. "IO port 0x3f8 out at rip=0xffffffff81... (3.2 ms earlier)";
        None before the first exit."""
        if self.at_ns == 0:
            return None
        now = time.monotonic_ns() if now_ns is None else now_ns
        image = self.image
        parts = [describe_exit(image.run)]
        sync = image.sync
        if self.classes & structs.KVM_SYNC_X86_REGS:
            parts.append(f"at rip={sync.regs.rip:#x} rsp={sync.regs.rsp:#x}")
        if self.classes & structs.KVM_SYNC_X86_SREGS:
            sregs = sync.sregs
            parts.append(f"cs={sregs.cs.selector:#x} cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x}")
        if self.classes & structs.KVM_SYNC_X86_EVENTS:
            event = describe_events(sync.events)
            if event:
                parts.append(event)
        parts.append(f"({max(0, now - self.at_ns) / 1e6:.1f} ms earlier)")
        return " ".join(parts)


def describe_exit(run: structs.KvmRun) -> str:
    """An exit's reason and what it was about, from a kvm_run head."""
    reason = int(run.exit_reason)
    if reason == structs.KVM_EXIT_IO:
        io = run.exit.io
        direction = "out" if io.direction == structs.KVM_EXIT_IO_OUT else "in"
        return f"IO port {io.port:#x} {direction} (size {io.size}, count {io.count})"
    if reason == structs.KVM_EXIT_MMIO:
        mmio = run.exit.mmio
        return f"MMIO {'write' if mmio.is_write else 'read'} at {mmio.phys_addr:#x} (len {mmio.len})"
    if reason == structs.KVM_EXIT_SYSTEM_EVENT:
        return f"a system event (type {run.exit.system_event.type})"
    return _EXIT_NAMES.get(reason, f"KVM exit {reason}")


def describe_events(events: structs.KvmVcpuEvents) -> str:
    """An exception or interrupt being delivered, an NMI in flight, or a pending triple fault; "" when none."""
    found = []
    exception = events.exception
    if exception.injected or exception.pending:
        state = "injected" if exception.injected else "pending"
        code = f" error code {exception.error_code:#x}" if exception.has_error_code else ""
        found.append(f"exception {exception.nr} {state}{code}")
    if events.interrupt.injected:
        found.append(f"interrupt {events.interrupt.nr} injected")
    if events.nmi.injected or events.nmi.pending:
        found.append("NMI " + ("injected" if events.nmi.injected else "pending"))
    if events.triple_fault.pending:
        found.append("triple fault pending")
    return ", ".join(found)


def page_walk_lines(memory: "page_walk.Reader", trail: ExitTrail, others: dict[int, ExitTrail] | None = None
                    ) -> tuple[str, ...]:  # fmt: skip
    """The guest's page tables walked from the trail's CR3 for its RIP, RSP, the last RIP of each vCPU in
    `others` (by index) and the IDT's #PF/#DF gates (memvisor/vmm/page_walk.py); () without registers and special
    registers in the trail. Never raises: this runs on the vCPU thread that met the triple fault, and the reset
    must happen whatever the tables hold. (Another vCPU's trail may be mid-copy: its RIP is evidence, no more.)"""
    needed = structs.KVM_SYNC_X86_REGS | structs.KVM_SYNC_X86_SREGS
    if trail.at_ns == 0 or trail.classes & needed != needed:
        return ()
    regs, sregs = trail.image.sync.regs, trail.image.sync.sregs
    extra = [(f"vCPU {index}'s last rip", int(other.image.sync.regs.rip))
             for index, other in sorted((others or {}).items())
             if other is not trail and other.at_ns and other.classes & structs.KVM_SYNC_X86_REGS]  # fmt: skip
    try:
        from memvisor.vmm import page_walk

        report = page_walk.describe(memory, cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer,
                                    rip=regs.rip, rsp=regs.rsp, idt_base=sregs.idt.base, idt_limit=sregs.idt.limit,
                                    extra=extra, at_ns=time.monotonic_ns())
    except Exception as err:  # a bug here must not keep the guest from resetting
        return (f"page walk failed: {type(err).__name__}: {err}",)
    return tuple(report.lines)
