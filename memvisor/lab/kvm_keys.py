"""Hold KVM's static keys enabled for the whole lab, so that starting and stopping guests never patches kernel text.

Why: the lab's kernel (L1) wedged for good when guests were started and stopped many times in a row (the CI hang of
issue 13). Both lab vCPUs were found, again and again, at the same instruction, `finish_task_switch+0x9f`: the
2-byte NOP of the `preempt_notifier_key` static branch (kernel/sched/core.c, `fire_sched_in_preempt_notifiers`).
KVM increments that key when a VM is created and decrements it when the last VM goes (`preempt_notifier_inc/dec`
in virt/kvm/kvm_main.c), and each 0 <-> 1 change rewrites every site of the branch with `text_poke_bp`: an INT3
written over the live instruction, IPIs to the other CPUs, then the new bytes. Under QEMU's multi-threaded TCG that
cross-CPU code patching can livelock the kernel; the watchdog then reports soft lockups and RCU stalls at that
address and nothing in the lab runs again.

Reproduced and measured (scripts/stress-kvm-keys): creating and closing empty VMs in a loop while both lab CPUs
context-switch wedged the lab after 200-400 VMs; with one VM held open from the start, 3000 VMs went through.

So the agent opens one VM at start and keeps it until the lab powers off. It also holds the two keys the in-kernel
local APIC flips (arch/x86/kvm/lapic.c: `apic_sw_disabled` while a vCPU's APIC is software-disabled, as at reset,
and `apic_hw_disabled` while its APIC_BASE enable bit is clear): one vCPU, never run, whose APIC is both. The cost
is a few pages of lab memory.

Self-contained on purpose: the agent imports nothing heavy (every import is a file read over 9p under TCG), so the
few ioctl numbers are spelled here from <linux/kvm.h> rather than imported from memvisor.kvm.
"""

from __future__ import annotations

import fcntl
import os
import struct

# <linux/kvm.h>: _IO(KVMIO, nr) = (0xAE << 8) | nr; KVM_SET_MSRS = _IOW(KVMIO, 0x89, struct kvm_msrs) (8 bytes).
KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60
KVM_SET_MSRS = (1 << 30) | (8 << 16) | (0xAE << 8) | 0x89
# struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; } entries[]; }
KVM_MSRS_ONE = struct.Struct("<IIIIQ")
MSR_IA32_APICBASE = 0x1B
APIC_BASE_DISABLED = 0xFEE00000  # the default base address, enable bit (11) clear

KVM_DEVICE = "/dev/kvm"


def hold_kvm_static_keys() -> list[int]:
    """Open the VM and vCPU that keep KVM's static keys enabled; return their fds (kept open until exit).

    Returns an empty list where there is no /dev/kvm (the lab then runs nothing that needs it). Raises OSError when
    KVM refuses one of the calls.
    """
    if not os.path.exists(KVM_DEVICE):
        return []
    fds: list[int] = []
    try:
        kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)  # preempt_notifier_key
        fds.append(vm)
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)  # its in-kernel LAPIC starts software-disabled: apic_sw_disabled
        fds.append(vcpu)
        fcntl.ioctl(vcpu, KVM_SET_MSRS, KVM_MSRS_ONE.pack(1, 0, MSR_IA32_APICBASE, 0, APIC_BASE_DISABLED))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds
