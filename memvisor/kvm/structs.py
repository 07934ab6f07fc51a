"""KVM's binary structures, as ctypes mirrors of <linux/kvm.h> and <asm/kvm.h> (x86_64).

Each structure's size is checked by tests/unit/test_kvm_structs.py against the kernel UAPI sizes.
"""

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (asm/kvm.h): general purpose registers."""

    _fields_ = [
        (name, u64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    """struct kvm_segment (asm/kvm.h)."""

    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable (asm/kvm.h): GDT/IDT base and limit."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (asm/kvm.h): segment and control registers."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmFpu(ctypes.Structure):
    """struct kvm_fpu (asm/kvm.h)."""

    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2 (asm/kvm.h)."""

    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
MAX_CPUID_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    """struct kvm_cpuid2 with room for MAX_CPUID_ENTRIES entries."""

    _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * MAX_CPUID_ENTRIES)]


class KvmMsrEntry(ctypes.Structure):
    """struct kvm_msr_entry (asm/kvm.h)."""

    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs_type(count: int) -> type[ctypes.Structure]:
    """struct kvm_msrs followed by `count` entries."""

    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * count)]

    return KvmMsrs


class KvmLapicState(ctypes.Structure):
    """struct kvm_lapic_state (asm/kvm.h): the 1 KiB local APIC register page."""

    _fields_ = [("regs", u8 * 1024)]


class KvmPitConfig(ctypes.Structure):
    """struct kvm_pit_config (KVM_CREATE_PIT2)."""

    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmIrqLevel(ctypes.Structure):
    """struct kvm_irq_level (KVM_IRQ_LINE)."""

    _fields_ = [("irq", u32), ("level", u32)]


class KvmIrqfd(ctypes.Structure):
    """struct kvm_irqfd (<linux/kvm.h>; api.rst "KVM_IRQFD"): a write to eventfd `fd` raises `gsi` in the in-kernel
    irqchip. Without KVM_IRQFD_FLAG_RESAMPLE KVM pulses the line (1 then 0), what an edge-triggered line needs;
    `resamplefd` is only read with that flag. KVM_IRQFD_FLAG_DEASSIGN removes the (fd, gsi) pair again.

        offset 0 fd u32, 4 gsi u32, 8 flags u32, 12 resamplefd u32, 16 pad[16]: 32 bytes
    """

    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class KvmIoeventfd(ctypes.Structure):
    """struct kvm_ioeventfd (<linux/kvm.h>; api.rst "KVM_IOEVENTFD"): a guest write of `len` bytes to MMIO (or,
    with KVM_IOEVENTFD_FLAG_PIO, port) address `addr` signals eventfd `fd` inside KVM instead of exiting to the
    VMM; with KVM_IOEVENTFD_FLAG_DATAMATCH only a write whose value equals `datamatch` does (others exit as
    before). KVM_IOEVENTFD_FLAG_DEASSIGN removes the registration with the same addr, len, fd and datamatch.

        offset 0 datamatch u64, 8 addr u64, 16 len u32, 20 fd s32, 24 flags u32, 28 pad[36]: 64 bytes
    """

    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", ctypes.c_int32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmDirtyLog(ctypes.Structure):
    """struct kvm_dirty_log (KVM_GET_DIRTY_LOG): slot and a pointer to the caller's bitmap."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(ctypes.Structure):
    """struct kvm_clear_dirty_log (Linux Documentation/virt/kvm/api.rst, "KVM_CLEAR_DIRTY_LOG"): clear and
    write-protect again the pages of `slot` from `first_page` (a multiple of 64) for `num_pages` (a multiple of
    64, or up to the slot's end) whose bit is set in the bitmap at `dirty_bitmap` (bit 0 = `first_page`). The
    C union of `void *dirty_bitmap` and `__u64 padding2` is one u64 here."""

    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmEnableCap(ctypes.Structure):
    """struct kvm_enable_cap (api.rst, "KVM_ENABLE_CAP"): a capability and its arguments."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 arguments (api.rst, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"): KVM_GET_DIRTY_LOG no longer clears nor protects.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class KvmRunIo(ctypes.Structure):
    """kvm_run.io: a port I/O exit; the data lives at kvm_run + data_offset."""

    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class KvmRunMmio(ctypes.Structure):
    """kvm_run.mmio: an MMIO exit; a read completes on the next KVM_RUN with `data` filled in."""

    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunSystemEvent(ctypes.Structure):
    """kvm_run.system_event."""

    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunInternal(ctypes.Structure):
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunExitUnion(ctypes.Union):
    _fields_ = [
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("system_event", KvmRunSystemEvent),
        ("internal", KvmRunInternal),
        ("hardware_exit_reason", u64),
        ("fail_entry_reason", u64),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """The head of struct kvm_run, the page shared between KVM and the vCPU thread."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExitUnion),
    ]


# Exit reasons (linux/kvm.h).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


# --- Snapshot state: the structures behind the vCPU and VM state getters and setters (asm/kvm.h, linux/kvm.h).


class KvmMpState(ctypes.Structure):
    """struct kvm_mp_state (KVM_GET/SET_MP_STATE)."""

    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
# The x86 states KVM accepts in KVM_SET_MP_STATE (the others are s390 or SEV-ES only).
X86_MP_STATES = (
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_SIPI_RECEIVED,
)

XSAVE_REGION_SIZE = 4096


class KvmXsave(ctypes.Structure):
    """struct kvm_xsave (KVM_GET/SET_XSAVE): the 4 KiB legacy XSAVE image (the flexible `extra` left out)."""

    _fields_ = [("region", u32 * (XSAVE_REGION_SIZE // 4))]


KVM_MAX_XCRS = 16


class KvmXcr(ctypes.Structure):
    """struct kvm_xcr."""

    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(ctypes.Structure):
    """struct kvm_xcrs (KVM_GET/SET_XCRS): the extended control registers (XCR0)."""

    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class KvmDebugregs(ctypes.Structure):
    """struct kvm_debugregs (KVM_GET/SET_DEBUGREGS)."""

    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class KvmVcpuEventsException(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class KvmVcpuEventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class KvmVcpuEventsNmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class KvmVcpuEventsSmi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEventsTripleFault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (KVM_GET/SET_VCPU_EVENTS): pending exceptions, interrupts, NMIs, SMIs."""

    _fields_ = [
        ("exception", KvmVcpuEventsException),
        ("interrupt", KvmVcpuEventsInterrupt),
        ("nmi", KvmVcpuEventsNmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", KvmVcpuEventsSmi),
        ("triple_fault", KvmVcpuEventsTripleFault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008


# --- Sync regs: KVM copies registers into kvm_run at every exit (KVM_CAP_SYNC_REGS).


class KvmSyncRegs(ctypes.Structure):
    """struct kvm_sync_regs (arch/x86/include/uapi/asm/kvm.h): what KVM stores into kvm_run.s.regs on every
    exit for the classes set in kvm_run.kvm_valid_regs. Guest-controlled values: read, never trusted."""

    _fields_ = [("regs", KvmRegs), ("sregs", KvmSregs), ("events", KvmVcpuEvents)]


SYNC_REGS_SIZE_BYTES = 2048  # linux/kvm.h: the size of kvm_run's `s` union


class KvmRunSyncUnion(ctypes.Union):
    """kvm_run.s (linux/kvm.h): the architecture's sync regs, padded to SYNC_REGS_SIZE_BYTES."""

    _fields_ = [("regs", KvmSyncRegs), ("padding", ctypes.c_char * SYNC_REGS_SIZE_BYTES)]


class KvmRunSync(ctypes.Structure):
    """The tail of struct kvm_run after the exit union (linux/kvm.h), at RUN_SYNC_OFFSET in the kvm_run page.

    kvm_valid_regs: the KVM_SYNC_X86_* classes KVM fills at every exit; kvm_dirty_regs: the classes userspace
    changed and KVM must load before entering the guest (memvisor never sets it: it does not write registers back).
    """

    _fields_ = [("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", KvmRunSyncUnion)]


RUN_SYNC_OFFSET = ctypes.sizeof(KvmRun)  # offsetof(struct kvm_run, kvm_valid_regs) == 0x130 on x86_64

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


class KvmClockData(ctypes.Structure):
    """struct kvm_clock_data (KVM_GET/SET_CLOCK): the VM's kvmclock in nanoseconds."""

    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

IRQCHIP_STATE_SIZE = 512


class KvmIrqchip(ctypes.Structure):
    """struct kvm_irqchip (KVM_GET/SET_IRQCHIP): one of the in-kernel PICs or the IOAPIC, as its raw 512 bytes."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * IRQCHIP_STATE_SIZE)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class KvmPitChannelState(ctypes.Structure):
    """struct kvm_pit_channel_state."""

    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),
    ]


class KvmPitState2(ctypes.Structure):
    """struct kvm_pit_state2 (KVM_GET/SET_PIT2)."""

    _fields_ = [("channels", KvmPitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


def kvm_msr_list_type(count: int) -> type[ctypes.Structure]:
    """struct kvm_msr_list followed by room for `count` indices (KVM_GET_MSR_INDEX_LIST)."""

    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * count)]

    return KvmMsrList
