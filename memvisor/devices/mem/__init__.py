"""virtio-mem (device id 24): hot(un)plug of guest memory in blocks; see `device` for the behaviour."""

from memvisor.devices.mem.device import MemError, VirtioMemDevice

__all__ = ["MemError", "VirtioMemDevice"]
