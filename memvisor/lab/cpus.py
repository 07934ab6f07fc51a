"""Bring the lab's other CPUs online once the agent has finished the kernel's one-time text patching.

The lab boots with `maxcpus=1` (plan.py says why: cross-CPU text patching under QEMU's multi-threaded TCG can
wedge the boot). Loading KVM and opening the VM that holds its static keys (kvm_keys) patch kernel text while
only the boot CPU runs; then every CPU QEMU was given is brought online through sysfs, as a user would with
`echo 1 > /sys/devices/system/cpu/cpuN/online`. KVM enables virtualization on each CPU as it comes online.

Self-contained, like kvm_keys: the agent imports nothing heavy.
"""

from __future__ import annotations

import os

CPU_SYSFS = "/sys/devices/system/cpu"


def bring_cpus_online(sysfs: str = CPU_SYSFS) -> list[int]:
    """Write 1 to the `online` file of every present CPU that is offline; return their numbers, in order.

    A CPU without an `online` file (the boot CPU) is always online. Raises OSError when the kernel refuses one.
    """
    brought: list[int] = []
    with open(os.path.join(sysfs, "present")) as file:
        present = file.read().strip()
    for cpu in _cpu_list(present):
        path = os.path.join(sysfs, f"cpu{cpu}", "online")
        if not os.path.exists(path):
            continue
        with open(path) as file:
            if file.read().strip() == "1":
                continue
        with open(path, "w") as file:
            file.write("1")
        brought.append(cpu)
    return brought


def _cpu_list(text: str) -> list[int]:
    """The kernel's CPU list format (Documentation/admin-guide/cputopology.rst): `0-3,5,7-8`."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus
