"""The x86 vCPU and VM-wide KVM state as data, captured from KVM and restored into it in a safe order.

Each KVM structure is kept as its exact bytes (the layouts of memvisor.kvm.structs, checked against
<linux/kvm.h>), MSRs as (index, value) pairs. `validate()` checks sizes and the fields KVM would act on
without complaint but the guest would not survive (an unknown MP state, an MSR list with repeats).

Restore order (restore_vcpu), learnt from other VMMs' bugs (Firecracker issues 4099 and 4666,
kata-containers 13798):
  CPUID -> TSC frequency -> special registers -> registers -> XSAVE/FPU -> XCRs -> debug registers
  -> LAPIC -> MSRs (all but the two clock MSRs) -> events -> MP state;
then, for every vCPU, right before the vCPUs first run (restore_vcpu_clock): TSC -> TSC_DEADLINE, and last the
VM clock (KVM_SET_CLOCK).
The LAPIC goes before the MSRs, else the TSC-deadline write is dropped while the LAPIC timer is not in
deadline mode and the guest's next timer never fires; the TSC goes before TSC_DEADLINE, which is an
absolute TSC value. The TSC goes last of all because the guest's TSC counts from the moment it is written:
written with the other MSRs, every second spent restoring the devices and starting the VMM's threads passed
in the guest too (a `sleep 5` in a restored guest measured 7.1 s by its own clock in the lab).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import TypeVar

from memvisor.kvm import structs
from memvisor.kvm.ioctls import KvmIoctlError
from memvisor.kvm.system import Kvm, Vcpu, Vm
from memvisor.snapshot.codec import StateError, require, require_length

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_TSC_ADJUST = 0x3B
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082

# MSRs a restored guest cannot do without: a refusal of any of these fails the restore. Others KVM lists but
# refuses to take back (it happens with MSRs of features the CPU model lacks) are skipped with a warning.
CRITICAL_MSRS = frozenset({
    MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW, MSR_STAR, MSR_LSTAR,
    0xC0000083, 0xC0000084, 0xC0000102,  # CSTAR, SYSCALL_MASK, KERNEL_GS_BASE
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # PAT
})  # fmt: skip
log = logging.getLogger(__name__)

_CPUID_ENTRY_SIZE = ctypes.sizeof(structs.KvmCpuidEntry2)
S = TypeVar("S", bound=ctypes.Structure)


def _raw(struct_value: ctypes.Structure) -> bytes:
    return bytes(memoryview(struct_value).cast("B"))


def _from_raw(cls: type[S], data: bytes) -> S:
    value = cls()
    ctypes.memmove(ctypes.addressof(value), data, ctypes.sizeof(cls))
    return value


@dataclass(frozen=True)
class VcpuState:
    """One vCPU: every piece of state KVM holds for it."""

    index: int
    mp_state: int
    regs: bytes  # struct kvm_regs
    sregs: bytes  # struct kvm_sregs
    xsave: bytes  # struct kvm_xsave (4 KiB); empty when KVM has no XSAVE, then `fpu` holds the FPU
    fpu: bytes  # struct kvm_fpu
    xcrs: bytes  # struct kvm_xcrs; empty without KVM_CAP_XCRS
    debugregs: bytes  # struct kvm_debugregs
    lapic: bytes  # struct kvm_lapic_state
    events: bytes  # struct kvm_vcpu_events
    msrs: tuple[tuple[int, int], ...]
    tsc_khz: int
    cpuid: bytes  # the kvm_cpuid_entry2 entries, nent * 40 bytes

    def validate(self) -> None:
        require(0 <= self.index < 256, "index", f"{self.index} is not a vCPU index")
        require(self.mp_state in structs.X86_MP_STATES, "mp_state", f"{self.mp_state} is not an x86 MP state")
        require_length(self.regs, ctypes.sizeof(structs.KvmRegs), "regs")
        require_length(self.sregs, ctypes.sizeof(structs.KvmSregs), "sregs")
        require(len(self.xsave) in (0, structs.XSAVE_REGION_SIZE), "xsave", f"is {len(self.xsave)} bytes, "
                f"expected {structs.XSAVE_REGION_SIZE}")  # fmt: skip
        require_length(self.fpu, ctypes.sizeof(structs.KvmFpu), "fpu")
        require(len(self.xcrs) in (0, ctypes.sizeof(structs.KvmXcrs)), "xcrs", f"is {len(self.xcrs)} bytes")
        if self.xcrs:
            require(_from_raw(structs.KvmXcrs, self.xcrs).nr_xcrs <= structs.KVM_MAX_XCRS, "xcrs",
                    "nr_xcrs is over 16")  # fmt: skip
        require_length(self.debugregs, ctypes.sizeof(structs.KvmDebugregs), "debugregs")
        require_length(self.lapic, ctypes.sizeof(structs.KvmLapicState), "lapic")
        require_length(self.events, ctypes.sizeof(structs.KvmVcpuEvents), "events")
        indices = [index for index, _ in self.msrs]
        require(len(set(indices)) == len(indices), "msrs", "an MSR appears twice")
        for position, (index, value) in enumerate(self.msrs):
            require(0 <= index < 1 << 32, f"msrs[{position}]", f"index {index:#x} does not fit 32 bits")
            require(0 <= value < 1 << 64, f"msrs[{position}]", f"value of MSR {index:#x} does not fit 64 bits")
        require(0 <= self.tsc_khz < 1 << 32, "tsc_khz", f"{self.tsc_khz} is out of range")
        require(len(self.cpuid) % _CPUID_ENTRY_SIZE == 0, "cpuid", "is not a whole number of CPUID entries")
        require(0 < len(self.cpuid) // _CPUID_ENTRY_SIZE <= structs.MAX_CPUID_ENTRIES, "cpuid",
                f"holds {len(self.cpuid) // _CPUID_ENTRY_SIZE} entries, expected 1 to {structs.MAX_CPUID_ENTRIES}")  # fmt: skip

    @property
    def msr_dict(self) -> dict[int, int]:
        return dict(self.msrs)


@dataclass(frozen=True)
class VmState:
    """VM-wide KVM state: kvmclock, the two PICs, the IOAPIC and the PIT."""

    clock: int  # kvmclock in ns (KVM_GET_CLOCK)
    clock_flags: int
    clock_realtime: int  # host CLOCK_REALTIME in ns at `clock`, when clock_flags has KVM_CLOCK_REALTIME
    pic_master: bytes  # 512 bytes each: struct kvm_irqchip's union
    pic_slave: bytes
    ioapic: bytes
    pit: bytes  # struct kvm_pit_state2

    def validate(self) -> None:
        require(0 <= self.clock < 1 << 64, "clock", f"{self.clock} does not fit 64 bits")
        require(0 <= self.clock_realtime < 1 << 64, "clock_realtime", "does not fit 64 bits")
        require(0 <= self.clock_flags < 1 << 32, "clock_flags", "does not fit 32 bits")
        for name in ("pic_master", "pic_slave", "ioapic"):
            require_length(getattr(self, name), structs.IRQCHIP_STATE_SIZE, name)
        require_length(self.pit, ctypes.sizeof(structs.KvmPitState2), "pit")


MSR_IA32_APICBASE = 0x1B  # saved in the special registers: written again after the LAPIC it would reset it


def savable_msrs(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST this vCPU can read (KVM lists some the CPU model does not have)."""
    readable: list[int] = []
    remaining = [index for index in kvm.msr_index_list() if index != MSR_IA32_APICBASE]
    while remaining:
        values = vcpu.read_msrs(remaining)
        readable += list(values)
        remaining = remaining[len(values) + 1 :]  # skip the one KVM stopped at
    return readable


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """Read a stopped vCPU's complete state (its thread must not be in KVM_RUN)."""
    try:
        xsave = _raw(vcpu.get_xsave())
    except KvmIoctlError:
        xsave = b""
    try:
        xcrs = _raw(vcpu.get_xcrs())
    except KvmIoctlError:
        xcrs = b""
    cpuid = vcpu.get_cpuid2()
    msrs = vcpu.read_msrs(msr_indices)
    return VcpuState(
        index=vcpu.index,
        mp_state=vcpu.get_mp_state(),
        regs=_raw(vcpu.get_regs()),
        sregs=_raw(vcpu.get_sregs()),
        xsave=xsave,
        fpu=_raw(vcpu.get_fpu()),
        xcrs=xcrs,
        debugregs=_raw(vcpu.get_debugregs()),
        lapic=_raw(vcpu.get_lapic()),
        events=_raw(vcpu.get_vcpu_events()),
        msrs=tuple(sorted(msrs.items())),
        tsc_khz=vcpu.get_tsc_khz(),
        cpuid=bytes(memoryview(cpuid.entries).cast("B"))[: cpuid.nent * _CPUID_ENTRY_SIZE],
    )


CLOCK_MSRS = (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE)  # in this order, and after everything else


def clock_msrs(msrs: dict[int, int]) -> list[tuple[int, int]]:
    """The TSC then TSC_DEADLINE, those of them that were saved."""
    return [(index, msrs[index]) for index in CLOCK_MSRS if index in msrs]


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Load `state` into a freshly created vCPU, in the order the module docstring gives."""
    if state.index != vcpu.index:
        raise StateError(f"vcpus[{vcpu.index}].index: {state.index} does not match vCPU {vcpu.index}")
    cpuid = structs.KvmCpuid2()
    cpuid.nent = len(state.cpuid) // _CPUID_ENTRY_SIZE
    ctypes.memmove(ctypes.addressof(cpuid.entries), state.cpuid, len(state.cpuid))
    vcpu.set_cpuid2(cpuid)
    if state.tsc_khz and vcpu.get_tsc_khz() != state.tsc_khz:
        try:
            vcpu.set_tsc_khz(state.tsc_khz)
        except KvmIoctlError as error:
            raise StateError(
                f"vcpus[{vcpu.index}].tsc_khz: this host cannot run the guest's TSC at {state.tsc_khz} kHz "
                f"({error.strerror}): restore on a host with the same TSC frequency"
            ) from None
    vcpu.set_sregs(_from_raw(structs.KvmSregs, state.sregs))
    vcpu.set_regs(_from_raw(structs.KvmRegs, state.regs))
    if state.xsave:
        vcpu.set_xsave(_from_raw(structs.KvmXsave, state.xsave))
    else:
        vcpu.set_fpu(_from_raw(structs.KvmFpu, state.fpu))
    if state.xcrs:
        vcpu.set_xcrs(_from_raw(structs.KvmXcrs, state.xcrs))
    vcpu.set_debugregs(_from_raw(structs.KvmDebugregs, state.debugregs))
    vcpu.set_lapic(_from_raw(structs.KvmLapicState, state.lapic))
    write_msrs(vcpu, [(i, v) for i, v in state.msr_dict.items() if i not in CLOCK_MSRS])
    events = _from_raw(structs.KvmVcpuEvents, state.events)
    events.flags |= structs.KVM_VCPUEVENT_VALID_NMI_PENDING | structs.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    events.flags |= structs.KVM_VCPUEVENT_VALID_SHADOW
    vcpu.set_vcpu_events(events)
    vcpu.set_mp_state(state.mp_state)


def restore_vcpu_clock(vcpu: Vcpu, state: VcpuState) -> None:
    """The TSC, then TSC_DEADLINE (an absolute TSC value, armed against the TSC just written): after
    restore_vcpu, right before the vCPU first runs, so no restore work passes in the guest's time."""
    write_msrs(vcpu, clock_msrs(state.msr_dict))


def write_msrs(vcpu: Vcpu, msrs: list[tuple[int, int]]) -> list[int]:
    """Write `msrs` in order; an MSR KVM refuses fails the restore if critical, else is skipped (returned)."""
    skipped: list[int] = []
    while msrs:
        done = vcpu.write_msrs(msrs)
        if done >= len(msrs):
            break
        index, value = msrs[done]
        if index in CRITICAL_MSRS:
            raise StateError(f"vcpus[{vcpu.index}].msrs: KVM refused MSR {index:#x} = {value:#x}")
        log.warning("vCPU %d: KVM refused MSR %#x = %#x; left at its reset value", vcpu.index, index, value)
        skipped.append(index)
        msrs = msrs[done + 1 :]
    return skipped


def capture_vm(vm: Vm) -> VmState:
    clock = vm.get_clock()
    return VmState(
        clock=int(clock.clock),
        clock_flags=int(clock.flags),
        clock_realtime=int(clock.realtime),
        pic_master=vm.get_irqchip(structs.KVM_IRQCHIP_PIC_MASTER),
        pic_slave=vm.get_irqchip(structs.KVM_IRQCHIP_PIC_SLAVE),
        ioapic=vm.get_irqchip(structs.KVM_IRQCHIP_IOAPIC),
        pit=_raw(vm.get_pit2()),
    )


def restore_vm(vm: Vm, state: VmState) -> None:
    """The VM clock, the interrupt controllers and the PIT: before any vCPU runs."""
    vm.set_clock(state.clock)
    vm.set_irqchip(structs.KVM_IRQCHIP_PIC_MASTER, state.pic_master)
    vm.set_irqchip(structs.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave)
    vm.set_irqchip(structs.KVM_IRQCHIP_IOAPIC, state.ioapic)
    vm.set_pit2(_from_raw(structs.KvmPitState2, state.pit))
