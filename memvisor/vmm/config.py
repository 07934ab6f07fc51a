"""What a machine is made of: the user's choices, validated, before anything is built."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memvisor.errors import UsageError
from memvisor.memory.backend import DEFAULT_BACKEND, MemoryBackend
from memvisor.units import format_size

MIN_MEMORY = 128 << 20
MAX_VCPUS = 8
BASE_CMDLINE = (
    "console=ttyS0 8250.nr_uarts=2 quiet pci=off io_delay=none "
    "memhp_default_state=online_movable panic=-1 reboot=acpi"
)


@dataclass
class MachineConfig:
    memory: int
    vcpus: int
    kernel: Path
    initrd: Path | None
    append: str = ""
    reboot: Literal["restart", "exit"] = "restart"
    console_path: Path | None = None  # None: the console goes to standard output
    extra_devices: list[str] = field(default_factory=list)
    numa_nodes: int = 1
    memory_backend: MemoryBackend = DEFAULT_BACKEND

    def validate(self) -> None:
        self.validate_resources()
        if not self.kernel.is_file():
            raise UsageError(f"kernel {self.kernel} does not exist: give --kernel a bzImage or vmlinux, or omit it")
        if self.initrd is not None and not self.initrd.is_file():
            raise UsageError(f"initramfs {self.initrd} does not exist: give --initrd a file or omit it")

    def validate_resources(self) -> None:
        """Memory, vCPUs and NUMA nodes: what can be checked before any file exists."""
        if self.memory < MIN_MEMORY:
            raise UsageError(f"--memory {format_size(self.memory)} is too small: give at least 128M")
        if self.memory % (2 << 20):
            raise UsageError(f"--memory {self.memory} is not a multiple of 2M: round it, e.g. 512M or 1G")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise UsageError(f"--vcpus {self.vcpus} is out of range: give 1 to {MAX_VCPUS}")
        if not 1 <= self.numa_nodes <= 8:
            raise UsageError(f"--numa-nodes {self.numa_nodes} is out of range: give 1 to 8")
        available = host_memory_available()
        # hugetlbfs pages come from their own pool, outside MemAvailable: mapping the RAM checks the pool.
        if available is not None and self.memory > available and self.memory_backend.kind != "hugetlb":
            raise UsageError(
                f"--memory {format_size(self.memory)} is more than the host can give "
                f"({format_size(available // (1 << 20) * (1 << 20))} available): ask for less"
            )

    @property
    def cmdline(self) -> str:
        return f"{BASE_CMDLINE} {self.append}".strip()


def host_memory_available() -> int | None:
    """MemAvailable of the host in bytes, or None if /proc/meminfo cannot tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
