"""The error model (issue 12): one root, guest faults apart from host failures, one drain policy."""

from __future__ import annotations

from memvisor.control.machine_api import MachineError
from memvisor.devices.balloon import BalloonError
from memvisor.devices.console.device import ConsoleError
from memvisor.devices.mem import MemError
from memvisor.devices.pmem import PmemError
from memvisor.errors import GuestFault, HostFailure, MemvisorError, UsageError
from memvisor.memory.guest_memory import DiscardError, GuestMemoryError
from memvisor.virtio.device import VirtioDeviceError
from memvisor.virtio.queue import VirtqueueError


def test_one_root_with_guest_faults_apart_from_host_failures() -> None:
    for guest in (VirtqueueError, GuestMemoryError, VirtioDeviceError, BalloonError, MemError, PmemError,
                  ConsoleError):
        assert issubclass(guest, GuestFault) and not issubclass(guest, HostFailure), guest
    assert issubclass(DiscardError, HostFailure) and not issubclass(DiscardError, GuestFault)
    for kind in (GuestFault, HostFailure, UsageError, MachineError):
        assert issubclass(kind, MemvisorError)
