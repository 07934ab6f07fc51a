"""KVM ioctl request numbers, computed the way <asm-generic/ioctl.h> does, and a ctypes ioctl call.

`fcntl.ioctl` takes its integer argument as a signed C int (KVM_SET_TSS_ADDR 0xfffbd000 overflows) and holds
the GIL for large buffers, so every KVM call goes through libc's ioctl with ctypes, which releases the GIL
while a vCPU sits in KVM_RUN.
"""

import ctypes
import os

from memvisor.kvm import structs
from memvisor.memory.libc import LIBC

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


_sizeof = ctypes.sizeof
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, _sizeof(structs.KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, _sizeof(structs.KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, _sizeof(structs.KvmIrqLevel))
KVM_IRQFD = _iow(0x76, _sizeof(structs.KvmIrqfd))
KVM_CREATE_PIT2 = _iow(0x77, _sizeof(structs.KvmPitConfig))
KVM_IOEVENTFD = _iow(0x79, _sizeof(structs.KvmIoeventfd))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _sizeof(structs.KvmRegs))
KVM_SET_REGS = _iow(0x82, _sizeof(structs.KvmRegs))
KVM_GET_SREGS = _ior(0x83, _sizeof(structs.KvmSregs))
KVM_SET_SREGS = _iow(0x84, _sizeof(structs.KvmSregs))
KVM_SET_MSRS = _iow(0x89, 8)
KVM_SET_FPU = _iow(0x8D, _sizeof(structs.KvmFpu))
KVM_GET_LAPIC = _ior(0x8E, _sizeof(structs.KvmLapicState))
KVM_SET_LAPIC = _iow(0x8F, _sizeof(structs.KvmLapicState))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_GET_IRQCHIP = _iowr(0x62, _sizeof(structs.KvmIrqchip))
KVM_SET_IRQCHIP = _ior(0x63, _sizeof(structs.KvmIrqchip))  # _IOR in <linux/kvm.h>, a historical slip kept for ABI
KVM_SET_CLOCK = _iow(0x7B, _sizeof(structs.KvmClockData))
KVM_GET_CLOCK = _ior(0x7C, _sizeof(structs.KvmClockData))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_GET_FPU = _ior(0x8C, _sizeof(structs.KvmFpu))
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_MP_STATE = _ior(0x98, _sizeof(structs.KvmMpState))
KVM_SET_MP_STATE = _iow(0x99, _sizeof(structs.KvmMpState))
KVM_GET_VCPU_EVENTS = _ior(0x9F, _sizeof(structs.KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, _sizeof(structs.KvmVcpuEvents))
KVM_GET_PIT2 = _ior(0x9F, _sizeof(structs.KvmPitState2))
KVM_SET_PIT2 = _iow(0xA0, _sizeof(structs.KvmPitState2))
KVM_GET_DEBUGREGS = _ior(0xA1, _sizeof(structs.KvmDebugregs))
KVM_SET_DEBUGREGS = _iow(0xA2, _sizeof(structs.KvmDebugregs))
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, _sizeof(structs.KvmXsave))
KVM_SET_XSAVE = _iow(0xA5, _sizeof(structs.KvmXsave))
KVM_GET_XCRS = _ior(0xA6, _sizeof(structs.KvmXcrs))
KVM_SET_XCRS = _iow(0xA7, _sizeof(structs.KvmXcrs))
KVM_KVMCLOCK_CTRL = _io(0xAD)

# Capabilities (KVM_CHECK_EXTENSION).
KVM_ENABLE_CAP = _iow(0xA3, _sizeof(structs.KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, _sizeof(structs.KvmClearDirtyLog))

KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MP_STATE = 14
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SYNC_REGS = 74  # returns the KVM_SYNC_X86_* classes kvm_run.kvm_valid_regs may name
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_XSAVE2 = 208
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168

_ioctl = LIBC.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class KvmIoctlError(OSError):
    """An ioctl on a KVM file descriptor failed; `errno` says why."""


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | ctypes.Array | None = None) -> int:  # type: ignore[type-arg]
    """Call ioctl(fd, request, arg) through libc; `arg` is an integer or a ctypes object passed by address."""
    if arg is None:
        pointer: int | None = 0
    elif isinstance(arg, int):
        pointer = arg
    else:
        pointer = ctypes.addressof(arg)
    result: int = _ioctl(fd, request, pointer)
    if result < 0:
        err = ctypes.get_errno()
        raise KvmIoctlError(err, f"KVM ioctl {request:#x} failed: {os.strerror(err)}")
    return result
