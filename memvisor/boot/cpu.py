"""Per-vCPU setup for a 64-bit direct boot: CPUID, MSRs, registers, FPU and the local APIC's LINT pins.

The boot vCPU starts at the kernel's 64-bit entry in long mode; the others stay in KVM's wait-for-SIPI
state until Linux starts them through the in-kernel local APIC.
"""

import ctypes
import struct

from memvisor.boot import layout, pagetables
from memvisor.kvm import structs
from memvisor.kvm.system import Vcpu

CPUID_LEAF_FEATURES = 0x1
CPUID_LEAF_EXT_TOPOLOGY = 0xB
CPUID_LEAF_V2_EXT_TOPOLOGY = 0x1F
ECX_TSC_DEADLINE = 1 << 24
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WRITEBACK = 0x806  # MTRRs enabled, default type write-back (else the guest runs uncached)

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def vcpu_cpuid(supported: structs.KvmCpuid2, index: int, vcpus: int) -> structs.KvmCpuid2:
    """KVM's supported CPUID, made this vCPU's: APIC ID, CPU count, hypervisor and TSC-deadline bits."""
    cpuid = structs.KvmCpuid2()
    ctypes.memmove(ctypes.addressof(cpuid), ctypes.addressof(supported), ctypes.sizeof(cpuid))
    for position in range(cpuid.nent):
        entry = cpuid.entries[position]
        if entry.function == CPUID_LEAF_FEATURES:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (index << 24) | (vcpus << 16)
            entry.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE
            if vcpus > 1:
                entry.edx |= EDX_HTT
        elif entry.function in (CPUID_LEAF_EXT_TOPOLOGY, CPUID_LEAF_V2_EXT_TOPOLOGY):
            entry.edx = index
    return cpuid


def boot_msrs() -> dict[int, int]:
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
    }


def _segment(selector: int, seg_type: int, *, code: bool) -> structs.KvmSegment:
    return structs.KvmSegment(
        base=0,
        limit=0xFFFFF,
        selector=selector,
        type=seg_type,
        present=1,
        dpl=0,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
        avl=0,
        unusable=0,
    )


def long_mode_sregs(sregs: structs.KvmSregs) -> None:
    """Segments, descriptor tables and control registers for 64-bit entry with the boot page tables."""
    code = _segment(pagetables.CODE_SELECTOR, 0xB, code=True)
    data = _segment(pagetables.DATA_SELECTOR, 0x3, code=False)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = structs.KvmSegment(
        base=0,
        limit=0xFFFFF,
        selector=pagetables.TSS_SELECTOR,
        type=0xB,
        present=1,
        dpl=0,
        db=0,
        s=0,
        l=0,
        g=1,
        avl=0,
        unusable=0,
    )
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(pagetables.GDT_ENTRIES) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as a PC BIOS leaves them."""
    state = vcpu.get_lapic()
    raw = bytearray(state.regs)
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", raw, offset)[0]
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", raw, offset, value)
    ctypes.memmove(ctypes.addressof(state.regs), bytes(raw), len(raw))
    vcpu.set_lapic(state)


def setup_vcpu(vcpu: Vcpu, supported: structs.KvmCpuid2, vcpus: int, entry_point: int) -> None:
    """Everything a vCPU needs before its first KVM_RUN; only vCPU 0 gets boot registers."""
    vcpu.set_cpuid2(vcpu_cpuid(supported, vcpu.index, vcpus))
    vcpu.set_msrs(boot_msrs())
    setup_lapic(vcpu)
    if vcpu.index != 0:
        return
    fpu = structs.KvmFpu(fcw=0x37F, mxcsr=0x1F80)
    vcpu.set_fpu(fpu)
    sregs = vcpu.get_sregs()
    long_mode_sregs(sregs)
    vcpu.set_sregs(sregs)
    regs = structs.KvmRegs(
        rflags=0x2,
        rip=entry_point,
        rsp=layout.BOOT_STACK_TOP,
        rbp=layout.BOOT_STACK_TOP,
        rsi=layout.ZERO_PAGE_ADDR,
    )
    vcpu.set_regs(regs)
