"""virtio-pmem (device id 27): a host file as guest persistent memory; see `device` for the behaviour."""

from memvisor.devices.pmem.device import PmemError, VirtioPmemDevice

__all__ = ["PmemError", "VirtioPmemDevice"]
