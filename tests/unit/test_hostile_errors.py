"""The error model (issue 12): one root, guest faults apart from host failures, one drain policy."""

from __future__ import annotations

import os
import shutil
import tempfile

from memvisor.control.machine_api import MachineError
from memvisor.control.server import QmpServer
from memvisor.devices.balloon import BalloonError
from memvisor.devices.console.device import ConsoleError
from memvisor.devices.mem import MemError
from memvisor.devices.pmem import PmemError
from memvisor.errors import GuestFault, HostFailure, MemvisorError, UsageError
from memvisor.memory.guest_memory import DiscardError, GuestMemoryError
from memvisor.virtio.device import VirtioDeviceError
from memvisor.virtio.queue import VirtqueueError
from tests.unit.test_qmp_server import like_qemu, qmp


def test_one_root_with_guest_faults_apart_from_host_failures() -> None:
    for guest in (VirtqueueError, GuestMemoryError, VirtioDeviceError, BalloonError, MemError, PmemError,
                  ConsoleError):
        assert issubclass(guest, GuestFault) and not issubclass(guest, HostFailure), guest
    assert issubclass(DiscardError, HostFailure) and not issubclass(DiscardError, GuestFault)
    for kind in (GuestFault, HostFailure, UsageError, MachineError):
        assert issubclass(kind, MemvisorError)


def test_qmp_maps_a_device_error_once_at_its_boundary() -> None:
    """A device's own MemvisorError (no re-wrapping on the way) reaches the client as one GenericError."""
    sock_dir = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
    machine = like_qemu()

    def refuse(device_id: str, size: int) -> None:
        raise UsageError("virtio-mem requested size 3M must be a multiple of the block size 2M; choose such a size")

    machine.set_requested_size = refuse  # type: ignore[method-assign]
    server = QmpServer(os.path.join(sock_dir, "qmp.sock"), machine)
    server.start()
    try:
        reply = qmp(server, "qom-set", {"path": "vm0", "property": "requested-size", "value": 4 << 20})
    finally:
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert reply == {"error": {"class": "GenericError", "desc": "virtio-mem requested size 3M must be a multiple "
                                                               "of the block size 2M; choose such a size"}}
