"""Per-vCPU boot state (memvisor.boot.cpu) without KVM: CPUID edits, long-mode sregs, registers, LAPIC LINTs.

A fake vCPU records what setup_vcpu hands to it; the segment registers are checked against the GDT that
the same boot writes to guest memory (SDM 3.4.5), since VM entry wants both to agree.
"""

import ctypes
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from memvisor.boot import cpu, layout, pagetables
from memvisor.kvm import structs


def _supported() -> structs.KvmCpuid2:
    """A small stand-in for KVM_GET_SUPPORTED_CPUID."""
    cpuid = structs.KvmCpuid2()
    leaves = [
        (0x0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
        (0x1, 0, 0x000906EA, 0x00AB0800, 0x7FFAFBBF & ~(1 << 31) & ~(1 << 24), 0xBFEBFBFF & ~(1 << 28)),
        (0xB, 0, 0x1, 0x1, 0x100, 0xFFFF),
        (0xB, 1, 0x4, 0x4, 0x201, 0xFFFF),
        (0x1F, 0, 0x1, 0x1, 0x100, 0xFFFF),
        (0x80000001, 0, 0, 0, 0x121, 0x2C100800),
    ]
    for position, (function, index, eax, ebx, ecx, edx) in enumerate(leaves):
        cpuid.entries[position] = structs.KvmCpuidEntry2(
            function=function, index=index, flags=1 if function in (0xB, 0x1F) else 0,
            eax=eax, ebx=ebx, ecx=ecx, edx=edx,
        )  # fmt: skip
    cpuid.nent = len(leaves)
    return cpuid


def _leaf(cpuid: structs.KvmCpuid2, function: int, index: int = 0) -> structs.KvmCpuidEntry2:
    for position in range(cpuid.nent):
        entry = cpuid.entries[position]
        if entry.function == function and entry.index == index:
            return entry
    raise KeyError(function)


@pytest.mark.parametrize(("index", "vcpus"), [(0, 1), (0, 2), (1, 2), (7, 8), (3, 8)])
def test_cpuid_apic_id_and_count(index: int, vcpus: int) -> None:
    supported = _supported()
    before = bytes(supported)
    cpuid = cpu.vcpu_cpuid(supported, index, vcpus)
    assert bytes(supported) == before, "KVM's supported list is left alone"
    leaf1 = _leaf(cpuid, 0x1)
    assert leaf1.ebx >> 24 == index  # initial APIC id
    assert (leaf1.ebx >> 16) & 0xFF == vcpus  # logical processor count
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH line size and brand index kept
    assert leaf1.ecx & (1 << 31), "hypervisor bit"
    assert leaf1.ecx & (1 << 24), "TSC deadline"
    assert bool(leaf1.edx & (1 << 28)) == (vcpus > 1)  # HTT
    assert leaf1.eax == 0x000906EA
    for function, subleaf in ((0xB, 0), (0xB, 1), (0x1F, 0)):
        entry = _leaf(cpuid, function, subleaf)
        assert entry.edx == index  # x2APIC id
        assert entry.ecx == _leaf(supported, function, subleaf).ecx  # level numbers and types kept
    assert bytes(_leaf(cpuid, 0x0)) == bytes(_leaf(supported, 0x0))
    assert bytes(_leaf(cpuid, 0x80000001)) == bytes(_leaf(supported, 0x80000001))
    assert cpuid.nent == supported.nent


def _boot_sregs() -> structs.KvmSregs:
    sregs = structs.KvmSregs()
    sregs.apic_base = 0xFEE00900  # what KVM reports for the BSP; the boot must keep it
    cpu.long_mode_sregs(sregs)
    return sregs


def test_long_mode_control_registers() -> None:
    sregs = _boot_sregs()
    assert sregs.cr0 & cpu.CR0_PE and sregs.cr0 & cpu.CR0_PG
    assert sregs.cr0 & (1 << 0) and sregs.cr0 & (1 << 31)  # the architectural bit numbers
    assert sregs.cr4 & (1 << 5)  # PAE
    assert sregs.efer & (1 << 8) and sregs.efer & (1 << 10)  # LME, LMA
    assert sregs.cr3 == layout.PML4_ADDR
    assert sregs.apic_base == 0xFEE00900
    assert sregs.gdt.base == layout.GDT_ADDR
    assert sregs.gdt.limit == len(pagetables.build_gdt()) - 1
    assert sregs.idt.base == layout.IDT_ADDR


def test_cs_is_a_long_mode_code_segment() -> None:
    cs = _boot_sregs().cs
    assert cs.l == 1 and cs.db == 0 and cs.present == 1 and cs.s == 1 and cs.dpl == 0
    assert cs.selector == pagetables.CODE_SELECTOR
    assert cs.type & 0x8, "executable"


def _descriptor_fields(selector: int) -> dict[str, int]:
    raw = struct.unpack_from("<Q", pagetables.build_gdt(), selector & ~7)[0]
    return {
        "base": ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) << 24),
        "limit": (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16,
        "type": (raw >> 40) & 0xF,
        "s": (raw >> 44) & 1,
        "dpl": (raw >> 45) & 3,
        "present": (raw >> 47) & 1,
        "avl": (raw >> 52) & 1,
        "l": (raw >> 53) & 1,
        "db": (raw >> 54) & 1,
        "g": (raw >> 55) & 1,
    }


@pytest.mark.parametrize("register", ["cs", "ds", "es", "fs", "gs", "ss", "tr"])
def test_segment_registers_agree_with_their_gdt_descriptors(register: str) -> None:
    segment = getattr(_boot_sregs(), register)
    descriptor = _descriptor_fields(segment.selector)
    for name, value in descriptor.items():
        assert getattr(segment, name) == value, f"{register}.{name}"
    assert segment.unusable == 0


def test_data_segments_use_the_data_selector() -> None:
    sregs = _boot_sregs()
    for register in ("ds", "es", "fs", "gs", "ss"):
        assert getattr(sregs, register).selector == pagetables.DATA_SELECTOR
    assert sregs.tr.selector == pagetables.TSS_SELECTOR


def test_boot_msrs() -> None:
    msrs = cpu.boot_msrs()
    assert msrs[0x2FF] & (1 << 11), "MTRRs enabled"
    assert msrs[0x2FF] & 0xFF == 6, "default memory type write-back"
    assert msrs[0x1A0] & 1, "fast strings"
    assert all(msrs[index] == 0 for index in (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000102))


@dataclass
class FakeVcpu:
    """Records what setup_vcpu sets; get_* return a reset-like state."""

    index: int
    calls: dict[str, Any] = field(default_factory=dict)
    lapic: bytearray = field(default_factory=lambda: bytearray(1024))

    def __post_init__(self) -> None:
        for offset in (0x350, 0x360):  # LVTs come out of reset masked
            struct.pack_into("<I", self.lapic, offset, 0x10000)

    def set_cpuid2(self, cpuid: structs.KvmCpuid2) -> None:
        self.calls["cpuid"] = cpuid

    def set_msrs(self, msrs: dict[int, int]) -> None:
        self.calls["msrs"] = msrs

    def get_lapic(self) -> structs.KvmLapicState:
        state = structs.KvmLapicState()
        ctypes.memmove(ctypes.addressof(state), bytes(self.lapic), 1024)
        return state

    def set_lapic(self, state: structs.KvmLapicState) -> None:
        self.calls["lapic"] = bytes(state.regs)

    def set_fpu(self, fpu: structs.KvmFpu) -> None:
        self.calls["fpu"] = fpu

    def get_sregs(self) -> structs.KvmSregs:
        return structs.KvmSregs(apic_base=0xFEE00900)

    def set_sregs(self, sregs: structs.KvmSregs) -> None:
        self.calls["sregs"] = sregs

    def set_regs(self, regs: structs.KvmRegs) -> None:
        self.calls["regs"] = regs


def test_boot_vcpu_gets_registers_at_the_64_bit_entry() -> None:
    vcpu = FakeVcpu(0)
    cpu.setup_vcpu(vcpu, _supported(), 2, entry_point=0x1000200)  # type: ignore[arg-type]
    regs = vcpu.calls["regs"]
    assert regs.rip == 0x1000200
    assert regs.rsi == layout.ZERO_PAGE_ADDR  # boot.rst: %rsi holds the boot_params address
    assert regs.rflags & 0x2 and not regs.rflags & 0x200  # reserved bit 1 set, interrupts off
    assert regs.rsp == layout.BOOT_STACK_TOP
    assert vcpu.calls["sregs"].efer & cpu.EFER_LMA
    assert vcpu.calls["fpu"].fcw == 0x37F and vcpu.calls["fpu"].mxcsr == 0x1F80
    assert _leaf(vcpu.calls["cpuid"], 1).ebx >> 24 == 0


def test_secondary_vcpu_waits_for_sipi() -> None:
    vcpu = FakeVcpu(3)
    cpu.setup_vcpu(vcpu, _supported(), 4, entry_point=0x1000200)  # type: ignore[arg-type]
    assert set(vcpu.calls) == {"cpuid", "msrs", "lapic"}
    assert _leaf(vcpu.calls["cpuid"], 1).ebx >> 24 == 3


def test_lapic_lint0_extint_lint1_nmi() -> None:
    vcpu = FakeVcpu(0)
    cpu.setup_lapic(vcpu)  # type: ignore[arg-type]
    regs = vcpu.calls["lapic"]
    lint0 = struct.unpack_from("<I", regs, 0x350)[0]
    lint1 = struct.unpack_from("<I", regs, 0x360)[0]
    assert (lint0 >> 8) & 7 == 7  # delivery mode ExtINT
    assert (lint1 >> 8) & 7 == 4  # delivery mode NMI
    assert lint0 & 0x10000 and lint1 & 0x10000  # other bits (the mask) untouched
    assert regs[:0x350] == bytes(0x350)
