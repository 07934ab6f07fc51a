"""virtio-pmem state: save, restore into a device on the same file, save again gives equal state; a backing
file of another size is refused naming the field; quiesce waits for flushes in flight."""

import json
import threading
from pathlib import Path

import pytest

from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.devices.pmem.state import PmemState, check_pmem, quiesce_pmem, restore_pmem, save_pmem
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot.codec import StateError, decode, encode
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.state import restore_transport, save_transport
from tests.unit.test_virtio_pmem import FLUSH, PMEM_GPA, SIZE, RecordingFsync, Setup


def test_pmem_save_restore_save(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "pmem.img")
    try:
        assert setup.flush() == 0
        quiesce_pmem(setup.device)
        state = decode(PmemState, json.loads(json.dumps(encode(save_pmem(setup.device)))))
        transport_state = save_transport(setup.driver.transport)
        region = MemoryRegion.file(PMEM_GPA, setup.path, SIZE, name="pmem2")  # the new machine maps the same file
        fresh = VirtioPmemDevice(region, fsync=RecordingFsync())
        transport = VirtioMmioTransport(fresh, setup.memory, lambda: None)
        check_pmem(fresh, state, "pmem")
        restore_pmem(fresh, state)
        restore_transport(transport, transport_state, "transport")
        assert save_pmem(fresh) == state
        assert save_transport(transport) == transport_state
        assert state.counters and dict(state.counters)["flushes_ok"] == 1
        fresh.close()
        region.close()
    finally:
        setup.device.close()


def test_a_backing_file_of_another_size_is_refused(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "pmem.img")
    try:
        state = save_pmem(setup.device)
        bigger = PmemState(state.size * 2, state.readonly, state.counters)
        with pytest.raises(StateError, match=r"^pmem\.size: .*same backing file"):
            check_pmem(setup.device, bigger, "pmem")
    finally:
        setup.device.close()


def test_quiesce_waits_for_the_flush_in_flight(tmp_path: Path) -> None:
    gate = threading.Event()
    setup = Setup(tmp_path / "pmem.img", fsync=RecordingFsync(gate=gate))
    try:
        setup.submit([FLUSH], [4])
        threading.Timer(0.2, gate.set).start()
        quiesce_pmem(setup.device)
        assert gate.is_set()
        assert [h for h, _, _ in setup.queue.get_used()]  # the flush was answered before the state is read
    finally:
        setup.device.close()
