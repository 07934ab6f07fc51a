"""The kvmclock time a guest itself last read, from its pvclock page and its TSC: what a restore resumes.

KVM_GET_CLOCK gives the VM's kvmclock as KVM counts it. Only when it reports KVM_CLOCK_TSC_STABLE (KVM's master
clock, on a host whose clocksource is a stable TSC) is that the value the guest computes from its TSC; without
it KVM counts the host's monotonic clock plus an offset while the guest extrapolates from its own TSC between
KVM's updates of its pvclock page, and the two drift apart (in memvisor's lab, whose TSC is not stable, a
restored guest's clock jumped by about 10 s). Restoring KVM_GET_CLOCK's value then moves the guest's time
forward or stalls it until KVM's count catches up with what the guest last saw. QEMU does the same as here when
it cannot trust the clock (hw/i386/kvm/clock.c): at resume, the clock is what the guest's pvclock page gives for
the saved TSC of the first vCPU.

The page (struct pvclock_vcpu_time_info, Linux arch/x86/include/asm/pvclock-abi.h; KVM's MSR_KVM_SYSTEM_TIME_NEW
holds its guest physical address with bit 0 "enabled"), 32 bytes, little-endian:
    u32 version       0   odd while KVM updates the page
    u32 pad0          4
    u64 tsc_timestamp 8   the guest TSC when system_time was taken
    u64 system_time   16  kvmclock ns at tsc_timestamp
    u32 tsc_to_system_mul 24
    s8  tsc_shift     28
    u8  flags         29
    u8  pad[2]        30
Guest time at TSC t: system_time + (((t - tsc_timestamp) shifted by tsc_shift) * tsc_to_system_mul) >> 32
(Linux's pvclock_scale_delta).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from memvisor.memory.guest_memory import GuestMemoryError

PVCLOCK_PAGE = struct.Struct("<IIQQIbB2x")
KVM_SYSTEM_TIME_ENABLED = 1


def scale_delta(delta: int, mul: int, shift: int) -> int:
    """Linux's pvclock_scale_delta: TSC ticks to ns."""
    delta = delta >> -shift if shift < 0 else delta << shift
    return (delta * mul) >> 32


def guest_clock_ns(system_time_msr: int, tsc: int, read: Callable[[int, int], bytes]) -> int | None:
    """The kvmclock ns the guest reads at its TSC `tsc`, from the pvclock page MSR_KVM_SYSTEM_TIME_NEW points to
    (`read(gpa, length)` reads guest memory); None when kvmclock is off, the page cannot be read, is mid-update,
    or was written after `tsc` (then KVM_GET_CLOCK's value stands)."""
    if not system_time_msr & KVM_SYSTEM_TIME_ENABLED:
        return None
    try:
        page = read(system_time_msr & ~KVM_SYSTEM_TIME_ENABLED, PVCLOCK_PAGE.size)
    except GuestMemoryError:  # an address outside RAM (a hostile snapshot): KVM's value stands
        return None
    version, _, tsc_timestamp, system_time, mul, shift, _ = PVCLOCK_PAGE.unpack(page)
    if version & 1 or tsc < tsc_timestamp or mul == 0:
        return None
    return system_time + scale_delta(tsc - tsc_timestamp, mul, shift)
