"""The machine-level checks of a restore, before KVM is touched: a snapshot taken with another memory size,
vCPU count or devices than the restore command line is refused with a message naming the field and the fix,
and a corrupted file is refused; nothing of the machine is changed (no vCPU created)."""

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from memvisor.devices.console import VirtioConsoleDevice
from memvisor.devices.console.state import save_console
from memvisor.devices.i8042 import I8042
from memvisor.devices.legacy_state import save_i8042, save_rtc, save_serial
from memvisor.devices.rtc import CmosRtc
from memvisor.devices.serial import Serial16550
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.snapshot import fileformat
from memvisor.snapshot.codec import StateError, encode
from memvisor.snapshot.memory import save_region
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.state import save_transport
from memvisor.vmm.snapshot import MachineState, restore_snapshot
from tests.unit.test_snapshot_state import vcpu_state, vm_state

MiB = 1 << 20


def _machine(memory: int = 64 * MiB, vcpus: int = 1, devices: tuple[str, ...] = ()) -> Any:
    guest = GuestMemory([MemoryRegion.memfd(0, memory, "ram0")])
    console = VirtioConsoleDevice(lambda data: None)
    return SimpleNamespace(
        config=SimpleNamespace(memory=memory, vcpus=vcpus, numa_nodes=1, extra_devices=list(devices)),
        memory=guest,
        vcpus=[],
        devices=[],
        agent_console=console,
        agent_transport=VirtioMmioTransport(console, guest, lambda: None),
    )


def _state(machine: Any, **changes: Any) -> MachineState:
    uart = save_serial(Serial16550(lambda d: None, lambda level: None))
    fields: dict[str, Any] = dict(
        memory=machine.config.memory, vcpus=machine.config.vcpus, numa_nodes=1, devices=(),
        vm=vm_state(), cpus=tuple(vcpu_state(i) for i in range(machine.config.vcpus)), com1=uart, com2=uart,
        rtc=save_rtc(CmosRtc()), i8042=save_i8042(I8042(lambda: None)),
        agent_console=save_console(machine.agent_console), agent_transport=save_transport(machine.agent_transport),
        agent_ready=True, agent_on_com2=False, devices_state=(),
    )  # fmt: skip
    fields.update(changes)
    return MachineState(**fields)


def _write(path: Path, machine: Any, state: MachineState) -> None:
    region = machine.memory.regions[0]
    region.view[0:5] = b"hello"
    layout = fileformat.layout_regions([(region.name, region.gpa, region.size)])
    state_offset = fileformat.align_up(layout[0][1] + region.size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, state_offset)
        image = save_region(fd, region, region.name, *layout[0], lambda n: None)
        fileformat.write_header_and_state(fd, state_offset, encode(state), fileformat.MemoryImage((image,)))
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("saved", "restoring", "message"),
    [
        (dict(memory=64 * MiB), dict(memory=128 * MiB), r"^machine\.memory: .* give --memory 64M$"),
        (dict(vcpus=2), dict(vcpus=1), r"^machine\.vcpus: .* give --vcpus 2$"),
        (dict(), dict(devices=("virtio-balloon,id=b0",)), r"^machine\.devices: the snapshot was taken with no --device"),
    ],
)
def test_a_snapshot_of_another_machine_is_refused(
    tmp_path: Path, saved: dict[str, Any], restoring: dict[str, Any], message: str
) -> None:
    source = _machine(**saved)
    path = tmp_path / "vm.snap"
    _write(path, source, _state(source))
    target = _machine(**restoring)
    with pytest.raises(StateError, match=message):
        restore_snapshot(target, path)
    assert target.vcpus == []
    assert target.memory.regions[0].allocated_bytes() == 0  # nothing was loaded


def test_a_device_list_and_device_states_that_disagree_are_refused() -> None:
    machine = _machine()
    with pytest.raises(StateError, match="devices_state: holds 0 devices, the command line 1"):
        _state(machine, devices=("virtio-balloon,id=b0",)).validate()


def test_a_corrupted_state_is_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    machine = _machine()
    path = tmp_path / "vm.snap"
    _write(path, machine, _state(machine))
    state_offset = fileformat.HEADER.unpack(path.read_bytes()[: fileformat.HEADER.size])[3]
    with open(path, "r+b") as file:
        file.seek(state_offset + 100)
        byte = file.read(1)
        file.seek(state_offset + 100)
        file.write(bytes([byte[0] ^ 1]))
    target = _machine()
    with pytest.raises(StateError, match="checksum"):
        restore_snapshot(target, path)
    assert target.vcpus == [] and target.memory.regions[0].allocated_bytes() == 0


def test_a_queue_outside_ram_in_the_file_is_refused_naming_it(tmp_path: Path) -> None:
    machine = _machine()
    state = _state(machine)
    queues = list(state.agent_transport.queues)
    queues[0] = dataclasses.replace(queues[0], ready=True, desc_addr=1 << 40)
    state = dataclasses.replace(state, agent_transport=dataclasses.replace(state.agent_transport, queues=tuple(queues)))
    path = tmp_path / "vm.snap"
    _write(path, machine, state)
    with pytest.raises(StateError, match=r"^machine\.agent_transport\.queues\[0\]: queue 0: descriptor table"):
        restore_snapshot(_machine(), path)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    from memvisor.errors import MemvisorError

    with pytest.raises(MemvisorError, match="cannot open snapshot"):
        restore_snapshot(_machine(), tmp_path / "nothing.snap")


@pytest.mark.parametrize("keep", [0, 20, 4096 + 100, None])  # empty, part of the header, header only, no state
def test_a_truncated_file_is_refused_naming_the_problem(tmp_path: Path, keep: int | None) -> None:
    machine = _machine()
    path = tmp_path / "vm.snap"
    _write(path, machine, _state(machine))
    os.truncate(path, path.stat().st_size - 10 if keep is None else keep)
    target = _machine()
    with pytest.raises(fileformat.SnapshotFileError, match=r"^the file is truncated: .*\d"):
        restore_snapshot(target, path)
    assert target.vcpus == [] and target.memory.regions[0].allocated_bytes() == 0


def test_a_directory_or_an_unreadable_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memvisor.errors import MemvisorError

    with pytest.raises(MemvisorError, match=r"is not a regular file"):
        restore_snapshot(_machine(), tmp_path)
    machine = _machine()
    path = tmp_path / "vm.snap"
    _write(path, machine, _state(machine))

    def failing_pread(fd: int, length: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pread", failing_pread)
    with pytest.raises(MemvisorError, match=rf"^reading snapshot {path} failed: Input/output error$"):
        restore_snapshot(_machine(), path)


class _ClockRecorder:
    """A VM and its vCPUs that log, in one list, every setter and MSR write a restore makes."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def create_vcpu(self, index: int) -> Any:
        recorder = self

        class Vcpu:
            def __init__(self) -> None:
                self.index = index

            def get_tsc_khz(self) -> int:
                return 2_000_000

            def write_msrs(self, msrs: list[tuple[int, int]]) -> int:
                recorder.log.extend(f"vcpu{index} msr {msr:#x}" for msr, _ in msrs)
                return len(msrs)

            def __getattr__(self, name: str) -> Any:
                return lambda *args: recorder.log.append(f"vcpu{index} {name}")

        return Vcpu()

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.log.append(f"vm {name}")


def test_the_guest_clocks_are_set_when_the_vcpus_start_not_when_the_state_is_loaded() -> None:
    """The TSC counts from its write: written at load time, the device restores and the VMM's start passed in
    the guest too (a restored guest's `sleep 5` took 7.1 s by its own clock in the lab)."""
    from memvisor.devices.rtc import CmosRtc
    from memvisor.snapshot.cpu import MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE
    from memvisor.vmm.snapshot import _load_state

    machine = _machine(vcpus=2)
    recorder = _ClockRecorder()
    started: list[Any] = []
    machine.vm = recorder
    machine.com1 = Serial16550(lambda d: None, lambda level: None)
    machine.com2 = Serial16550(lambda d: None, lambda level: None)
    machine.rtc, machine.i8042 = CmosRtc(), I8042(lambda: None)
    machine.agent = SimpleNamespace(mark_ready=lambda: None)
    machine.before_first_run = started.append
    _load_state(machine, _state(machine))
    loaded = list(recorder.log)
    assert not any(f"msr {MSR_IA32_TSC:#x}" in e or f"msr {MSR_IA32_TSC_DEADLINE:#x}" in e for e in loaded), loaded
    assert loaded.count("vm set_clock") == 1 and "vcpu1 set_mp_state" in loaded  # restore_vm's early one only
    assert len(started) == 1
    recorder.log.clear()
    started[0]()  # what Machine.start runs right before the vCPU threads
    assert recorder.log == [
        f"vcpu0 msr {MSR_IA32_TSC:#x}", f"vcpu0 msr {MSR_IA32_TSC_DEADLINE:#x}",
        f"vcpu1 msr {MSR_IA32_TSC:#x}", f"vcpu1 msr {MSR_IA32_TSC_DEADLINE:#x}",
        "vm set_clock", "vcpu0 kvmclock_ctrl", "vcpu1 kvmclock_ctrl",
    ]  # fmt: skip
