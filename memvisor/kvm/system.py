"""Typed wrappers over the three KVM file descriptors: the system (/dev/kvm), a VM, and a vCPU.

Devices never see these handles; the machine (memvisor.vmm) owns them and hands devices callbacks.
"""

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from memvisor.errors import MemvisorError
from memvisor.kvm import ioctls, structs
from memvisor.kvm.ioctls import KvmIoctlError, ioctl

KVM_API_VERSION = 12


class Kvm:
    """The KVM system handle, /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MemvisorError(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd), or run with --lab on"
            ) from None
        except PermissionError:
            raise MemvisorError(
                f"cannot open {path}: permission denied; add your user to the kvm group"
            ) from None
        version = ioctl(self.fd, ioctls.KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise MemvisorError(f"KVM API version {version} is not the expected {KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, capability: int) -> int:
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, capability)

    def supported_cpuid(self) -> structs.KvmCpuid2:
        cpuid = structs.KvmCpuid2()
        cpuid.nent = structs.MAX_CPUID_ENTRIES
        ioctl(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID, cpuid)
        return cpuid

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM can save and restore for a vCPU (KVM_GET_MSR_INDEX_LIST: asked once for the count, then filled)."""
        probe = structs.kvm_msr_list_type(0)()
        try:
            ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmIoctlError as error:
            if error.errno != errno.E2BIG:
                raise
        count = int(probe.nmsrs)  # type: ignore[attr-defined]
        table = structs.kvm_msr_list_type(count)()
        table.nmsrs = count  # type: ignore[attr-defined]
        ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, table)
        return [int(index) for index in table.indices[: table.nmsrs]]  # type: ignore[attr-defined]

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, ioctls.KVM_CREATE_VM, 0))

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class MemorySlot:
    slot: int
    guest_phys_addr: int
    size: int
    userspace_addr: int
    flags: int


class Vm:
    """A KVM virtual machine file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.slots: dict[int, MemorySlot] = {}

    def set_tss_addr(self, address: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, address)

    def create_irqchip(self) -> None:
        ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        config = structs.KvmPitConfig(flags=structs.KVM_PIT_SPEAKER_DUMMY)
        ioctl(self.fd, ioctls.KVM_CREATE_PIT2, config)

    def set_memory_slot(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Map (size > 0) or remove (size == 0) a memory slot."""
        region = structs.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, region)
        if size:
            self.slots[slot] = MemorySlot(slot, guest_phys_addr, size, userspace_addr, flags)
        else:
            self.slots.pop(slot, None)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        """Fill `bitmap` (one bit per 4 KiB page of the slot) with the pages dirtied since the last call."""
        log = structs.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, ioctls.KVM_GET_DIRTY_LOG, log)

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (some answers, like KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's, are per VM)."""
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, capability)

    def enable_cap(self, capability: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM with up to four arguments; KvmIoctlError when KVM refuses."""
        cap = structs.KvmEnableCap(cap=capability)
        for index, value in enumerate(args):
            cap.args[index] = value
        ioctl(self.fd, ioctls.KVM_ENABLE_CAP, cap)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        """KVM_CLEAR_DIRTY_LOG (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): clear and protect again the pages
        `first_page + i` of `slot` whose bit i is set in `bitmap`."""
        log = structs.KvmClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page,
                                       dirty_bitmap=ctypes.addressof(bitmap))  # fmt: skip
        ioctl(self.fd, ioctls.KVM_CLEAR_DIRTY_LOG, log)

    def irq_line(self, gsi: int, level: int) -> None:
        ioctl(self.fd, ioctls.KVM_IRQ_LINE, structs.KvmIrqLevel(irq=gsi, level=level))

    def ioeventfd(self, fd: int, address: int, length: int, datamatch: int | None, *, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest MMIO write of `length` bytes at `address` (of value `datamatch`, unless None)
        signals eventfd `fd` instead of exiting; with `deassign`, remove that same registration again."""
        flags = 0 if datamatch is None else structs.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= structs.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = structs.KvmIoeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=fd, flags=flags)
        ioctl(self.fd, ioctls.KVM_IOEVENTFD, request)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """KVM_IRQFD without resampling: a write to eventfd `fd` pulses `gsi` (an edge); `deassign` removes it."""
        flags = structs.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, ioctls.KVM_IRQFD, structs.KvmIrqfd(fd=fd, gsi=gsi, flags=flags))

    # VM-wide state for snapshots: kvmclock, the in-kernel interrupt controllers and the PIT.
    def get_clock(self) -> structs.KvmClockData:
        data = structs.KvmClockData()
        ioctl(self.fd, ioctls.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, clock: int) -> None:
        """Set kvmclock to `clock` ns (flags 0: KVM does not take a realtime or host TSC correction)."""
        ioctl(self.fd, ioctls.KVM_SET_CLOCK, structs.KvmClockData(clock=clock))

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = structs.KvmIrqchip(chip_id=chip_id)
        ioctl(self.fd, ioctls.KVM_GET_IRQCHIP, chip)
        return bytes(chip.chip)

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        chip = structs.KvmIrqchip(chip_id=chip_id)
        ctypes.memmove(ctypes.addressof(chip.chip), state, min(len(state), structs.IRQCHIP_STATE_SIZE))
        ioctl(self.fd, ioctls.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> structs.KvmPitState2:
        state = structs.KvmPitState2()
        ioctl(self.fd, ioctls.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: structs.KvmPitState2) -> None:
        ioctl(self.fd, ioctls.KVM_SET_PIT2, state)

    def create_vcpu(self, index: int) -> "Vcpu":
        return Vcpu(self, index, ioctl(self.fd, ioctls.KVM_CREATE_VCPU, index))

    def close(self) -> None:
        os.close(self.fd)


class Vcpu:
    """A KVM vCPU file descriptor and its shared kvm_run page."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._run_map = mmap.mmap(
            fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.run_struct = structs.KvmRun.from_buffer(self._run_map)
        self.run_address = ctypes.addressof(self.run_struct)

    def run(self) -> int:
        """Enter the guest until the next exit; returns the exit reason (KVM_EXIT_INTR when interrupted)."""
        try:
            ioctl(self.fd, ioctls.KVM_RUN)
        except KvmIoctlError as error:
            if error.errno in (errno.EINTR, errno.EAGAIN):
                return structs.KVM_EXIT_INTR
            raise
        return int(self.run_struct.exit_reason)

    def enable_sync_regs(self, classes: int) -> int:
        """Ask KVM to copy the register `classes` (KVM_SYNC_X86_*) into kvm_run.s.regs at every exit, as far
        as KVM_CAP_SYNC_REGS supports them; returns the classes enabled (0: none, the capability is absent).

        Only kvm_valid_regs is written: kvm_dirty_regs stays 0, so KVM never loads registers from kvm_run."""
        try:
            supported = ioctl(self.vm.kvm.fd, ioctls.KVM_CHECK_EXTENSION, ioctls.KVM_CAP_SYNC_REGS)
        except KvmIoctlError:
            supported = 0
        enabled = classes & supported
        if enabled:
            structs.KvmRunSync.from_address(self.run_address + structs.RUN_SYNC_OFFSET).kvm_valid_regs = enabled
        return enabled

    def io_data(self, size: int) -> ctypes.Array:  # type: ignore[type-arg]
        """The data bytes of the current port I/O exit (inside the kvm_run page)."""
        return (ctypes.c_uint8 * size).from_address(self.run_address + self.run_struct.exit.io.data_offset)

    def get_regs(self) -> structs.KvmRegs:
        regs = structs.KvmRegs()
        ioctl(self.fd, ioctls.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: structs.KvmRegs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_REGS, regs)

    def get_sregs(self) -> structs.KvmSregs:
        sregs = structs.KvmSregs()
        ioctl(self.fd, ioctls.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: structs.KvmSregs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_SREGS, sregs)

    def set_fpu(self, fpu: structs.KvmFpu) -> None:
        ioctl(self.fd, ioctls.KVM_SET_FPU, fpu)

    def get_fpu(self) -> structs.KvmFpu:
        fpu = structs.KvmFpu()
        ioctl(self.fd, ioctls.KVM_GET_FPU, fpu)
        return fpu

    def set_cpuid2(self, cpuid: structs.KvmCpuid2) -> None:
        ioctl(self.fd, ioctls.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self) -> structs.KvmCpuid2:
        cpuid = structs.KvmCpuid2()
        cpuid.nent = structs.MAX_CPUID_ENTRIES
        ioctl(self.fd, ioctls.KVM_GET_CPUID2, cpuid)
        return cpuid

    def read_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read `indices` in order; KVM stops at the first MSR it cannot read, so fewer may come back."""
        if not indices:
            return {}
        table = structs.kvm_msrs_type(len(indices))()
        table.nmsrs = len(indices)  # type: ignore[attr-defined]
        for position, index in enumerate(indices):
            table.entries[position].index = index  # type: ignore[attr-defined]
        done = ioctl(self.fd, ioctls.KVM_GET_MSRS, table)
        return {int(e.index): int(e.data) for e in table.entries[:done]}  # type: ignore[attr-defined]

    def write_msrs(self, msrs: list[tuple[int, int]]) -> int:
        """Write the MSRs in the order given (order matters: the TSC before TSC_DEADLINE); KVM stops at the first
        it refuses: returns how many it wrote."""
        if not msrs:
            return 0
        table = structs.kvm_msrs_type(len(msrs))()
        table.nmsrs = len(msrs)  # type: ignore[attr-defined]
        for position, (index, value) in enumerate(msrs):
            table.entries[position].index = index  # type: ignore[attr-defined]
            table.entries[position].data = value  # type: ignore[attr-defined]
        return ioctl(self.fd, ioctls.KVM_SET_MSRS, table)

    def get_mp_state(self) -> int:
        state = structs.KvmMpState()
        ioctl(self.fd, ioctls.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_MP_STATE, structs.KvmMpState(mp_state=mp_state))

    def get_xsave(self) -> structs.KvmXsave:
        state = structs.KvmXsave()
        ioctl(self.fd, ioctls.KVM_GET_XSAVE, state)
        return state

    def set_xsave(self, state: structs.KvmXsave) -> None:
        ioctl(self.fd, ioctls.KVM_SET_XSAVE, state)

    def get_xcrs(self) -> structs.KvmXcrs:
        state = structs.KvmXcrs()
        ioctl(self.fd, ioctls.KVM_GET_XCRS, state)
        return state

    def set_xcrs(self, state: structs.KvmXcrs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_XCRS, state)

    def get_debugregs(self) -> structs.KvmDebugregs:
        state = structs.KvmDebugregs()
        ioctl(self.fd, ioctls.KVM_GET_DEBUGREGS, state)
        return state

    def set_debugregs(self, state: structs.KvmDebugregs) -> None:
        ioctl(self.fd, ioctls.KVM_SET_DEBUGREGS, state)

    def get_vcpu_events(self) -> structs.KvmVcpuEvents:
        state = structs.KvmVcpuEvents()
        ioctl(self.fd, ioctls.KVM_GET_VCPU_EVENTS, state)
        return state

    def set_vcpu_events(self, state: structs.KvmVcpuEvents) -> None:
        ioctl(self.fd, ioctls.KVM_SET_VCPU_EVENTS, state)

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, ioctls.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, ioctls.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> bool:
        """Tell KVM the guest was paused by the host (KVM_KVMCLOCK_CTRL), so its watchdog does not report a soft
        lockup; False when the guest has no kvmclock yet (EINVAL) and there is nothing to tell."""
        try:
            ioctl(self.fd, ioctls.KVM_KVMCLOCK_CTRL)
        except KvmIoctlError as error:
            if error.errno == errno.EINVAL:
                return False
            raise
        return True

    def set_msrs(self, msrs: dict[int, int]) -> None:
        table = structs.kvm_msrs_type(len(msrs))()
        table.nmsrs = len(msrs)
        for position, (index, value) in enumerate(msrs.items()):
            table.entries[position].index = index
            table.entries[position].data = value
        done = ioctl(self.fd, ioctls.KVM_SET_MSRS, table)
        if done != len(msrs):
            failed = list(msrs)[done]
            raise MemvisorError(f"KVM refused MSR {failed:#x} on vCPU {self.index}")

    def get_lapic(self) -> structs.KvmLapicState:
        state = structs.KvmLapicState()
        ioctl(self.fd, ioctls.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: structs.KvmLapicState) -> None:
        ioctl(self.fd, ioctls.KVM_SET_LAPIC, state)

    def close(self) -> None:
        del self.run_struct
        self._run_map.close()
        os.close(self.fd)
