"""Snapshot and restore of a whole machine: quiesce, the machine state as data, the snapshot file.

    result = save_snapshot(machine, Path("vm.snap"))     # the machine is left paused, as QEMU's migrate leaves it
    restore_snapshot(machine, Path("vm.snap"))           # into a machine built with the same command line,
    machine.start()                                      # before it ever ran

Quiesce (`quiesced`): the vCPUs are parked (Machine.pause), KVM is told the guest was stopped
(KVM_KVMCLOCK_CTRL, so the guest's watchdog does not report a soft lockup), and the agent console's lock is
held for the whole save, so no host thread can write guest memory or change device state while it is read.

The machine state is data (MachineState); restoring checks it all against the machine built from the restore
command line before anything is loaded: memory size, vCPU count, NUMA nodes and devices must match, and a
state that fails any check leaves no VM running. Restore order: guest RAM, interrupt controllers and PIT,
every vCPU but its clock MSRs (memvisor.snapshot.cpu gives the order: LAPIC before MSRs), the devices; then, in
Machine.start right before the vCPU threads start, each vCPU's TSC and TSC_DEADLINE and last the VM clock, so
the guest's time resumes when it runs again.

Devices: virtio-pmem (its contents are its backing file: restore needs the same file), virtio-mem (its
plugged blocks' contents are saved with RAM, unplugged blocks are holes) and virtio-balloon (inflated pages
are holes in RAM, so holes in the file; its stats timer is stopped while the state is read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memvisor.devices.balloon.device import BalloonDevice
from memvisor.devices.balloon.hinting import HintState
from memvisor.devices.balloon.state import (
    BalloonState,
    check_balloon,
    quiesce_balloon,
    restore_balloon,
    resume_balloon,
    save_balloon,
    stats_queue_index,
)
from memvisor.devices.console.state import ConsoleState, restore_console, save_console
from memvisor.devices.legacy_state import (
    I8042State,
    RtcState,
    SerialState,
    restore_i8042,
    restore_rtc,
    restore_serial,
    save_i8042,
    save_rtc,
    save_serial,
)
from memvisor.devices.mem.state import MemState, check_mem, restore_mem, save_mem
from memvisor.devices.pmem.device import VirtioPmemDevice
from memvisor.devices.pmem.state import PmemState, check_pmem, quiesce_pmem, restore_pmem, save_pmem
from memvisor.errors import MemvisorError
from memvisor.kvm.ioctls import KvmIoctlError
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot import fileformat
from memvisor.snapshot.codec import StateError, decode, encode, require
from memvisor.snapshot.cpu import (
    VcpuState,
    VmState,
    capture_vcpu,
    capture_vm,
    restore_vcpu,
    restore_vcpu_clock,
    restore_vm,
    savable_msrs,
)
from memvisor.snapshot.memory import load_region
from memvisor.virtio.device import STATUS_DRIVER_OK
from memvisor.virtio.state import TransportState, restore_transport, save_transport
from memvisor.vmm.config import MAX_VCPUS
from memvisor.vmm.machine import Machine

# numpy (seconds of Python start-up in the lab), the virtio-mem model and the writer, which need it, are imported
# where a save or a virtio-mem state needs them: restoring a machine without virtio-mem does not import numpy.
if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
PAUSE_TIMEOUT = 10.0
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class _ByteCounter:
    """Turns per-chunk byte counts (what snapshot.memory reports) into running totals for `progress`."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


SUPPORTED_DEVICES = ("virtio-pmem", "virtio-mem", "virtio-balloon")


@dataclass(frozen=True)
class DeviceState:
    """One --device: its transport and the device model's own state (one of the optional parts, by type)."""

    id: str
    type: str
    transport: TransportState
    pmem: PmemState | None
    mem: MemState | None
    balloon: BalloonState | None

    def validate(self) -> None:
        require(self.type in SUPPORTED_DEVICES, "type", f"{self.type} has no snapshot support")
        require((self.pmem is not None) == (self.type == "virtio-pmem"), "pmem", f"does not fit a {self.type}")
        require((self.mem is not None) == (self.type == "virtio-mem"), "mem", f"does not fit a {self.type}")
        require((self.balloon is not None) == (self.type == "virtio-balloon"), "balloon", f"does not fit a {self.type}")


@dataclass(frozen=True)
class MachineState:
    """Everything a machine is, besides its RAM: what the command line built, and the state of each part."""

    memory: int
    vcpus: int
    numa_nodes: int
    devices: tuple[str, ...]
    vm: VmState
    cpus: tuple[VcpuState, ...]
    com1: SerialState
    com2: SerialState
    rtc: RtcState
    i8042: I8042State
    agent_console: ConsoleState
    agent_transport: TransportState
    agent_ready: bool
    agent_on_com2: bool
    devices_state: tuple[DeviceState, ...]

    def validate(self) -> None:
        require(1 <= self.vcpus <= MAX_VCPUS, "vcpus", f"{self.vcpus} is not 1 to {MAX_VCPUS}")
        require(len(self.cpus) == self.vcpus, "cpus", f"holds {len(self.cpus)} vCPUs, expected {self.vcpus}")
        for position, cpu in enumerate(self.cpus):
            require(cpu.index == position, f"cpus[{position}].index", f"{cpu.index} is out of order")
        require(self.memory > 0, "memory", "is not positive")
        require(self.numa_nodes >= 1, "numa_nodes", "is below 1")
        require(len(self.devices_state) == len(self.devices), "devices_state",
                f"holds {len(self.devices_state)} devices, the command line {len(self.devices)}")  # fmt: skip


@dataclass(frozen=True)
class SaveResult:
    path: Path
    bytes_written: int  # guest page bytes written
    total_bytes: int  # guest RAM the file covers
    file_size: int
    allocated: int  # bytes the file really takes on disk
    seconds: float
    free_skipped: int = 0  # bytes of pages with data left out: hinted free by the guest, not written since


@contextlib.contextmanager
def quiesced(machine: Machine) -> Iterator[None]:
    """The machine with its vCPUs parked and its devices held; vCPUs stay paused afterwards (as QEMU's
    migrate leaves them: `cont` resumes)."""
    if machine.outcome is not None:
        raise MemvisorError("the guest is not running: there is nothing to snapshot")
    if not machine.pause(PAUSE_TIMEOUT):
        raise MemvisorError(f"the vCPUs did not stop within {PAUSE_TIMEOUT:.0f} s: try the snapshot again")
    signal_paused(machine)
    balloons = [a.device for a in machine.devices if isinstance(a.device, BalloonDevice)]
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(machine.agent_console.lock)
            for attached in machine.devices:
                if isinstance(attached.device, VirtioPmemDevice):
                    quiesce_pmem(attached.device)
                held.enter_context(attached.device.lock)
                if isinstance(attached.device, BalloonDevice):
                    quiesce_balloon(attached.device)
            yield
    finally:
        for balloon in balloons:  # its stats timer runs again (the guest sees its answers once resumed)
            resume_balloon(balloon)


def signal_paused(machine: Machine) -> None:
    """KVM_KVMCLOCK_CTRL on every vCPU: the guest learns it was stopped and does not warn of a soft lockup."""
    for vcpu in machine.vcpus:
        with contextlib.suppress(KvmIoctlError):
            vcpu.kvmclock_ctrl()


def unsupported_devices(machine: Machine) -> list[str]:
    return [f"{a.spec.type} {a.id}" for a in machine.devices if a.spec.type not in SUPPORTED_DEVICES]


def _device_state(attached: Any) -> DeviceState:
    from memvisor.devices.mem.device import VirtioMemDevice

    device = attached.device
    return DeviceState(
        id=attached.id,
        type=attached.spec.type,
        transport=save_transport(attached.transport),
        pmem=save_pmem(device) if isinstance(device, VirtioPmemDevice) else None,
        mem=save_mem(device) if isinstance(device, VirtioMemDevice) else None,
        balloon=save_balloon(device) if isinstance(device, BalloonDevice) else None,
    )


def capture_machine(machine: Machine) -> MachineState:
    """The state of a quiesced machine."""
    msrs = savable_msrs(machine.kvm, machine.vcpus[0])
    return MachineState(
        memory=machine.config.memory,
        vcpus=machine.config.vcpus,
        numa_nodes=machine.config.numa_nodes,
        devices=tuple(machine.config.extra_devices),
        vm=capture_vm(machine.vm),
        cpus=tuple(capture_vcpu(vcpu, msrs) for vcpu in machine.vcpus),
        com1=save_serial(machine.com1),
        com2=save_serial(machine.com2),
        rtc=save_rtc(machine.rtc),
        i8042=save_i8042(machine.i8042),
        agent_console=save_console(machine.agent_console),
        agent_transport=save_transport(machine.agent_transport),
        agent_ready=machine.agent.ready,
        agent_on_com2=machine.agent_on_com2,
        devices_state=tuple(_device_state(attached) for attached in machine.devices),
    )


def saved_regions(machine: Machine) -> list[MemoryRegion]:
    """The regions the file holds: RAM (and virtio-mem); pmem lives in its own backing file."""
    return [region for region in machine.memory.regions if not region.name.startswith("pmem-")]


def save_snapshot(machine: Machine, path: Path, progress: Progress | None = None) -> SaveResult:
    """Quiesce `machine` and write its snapshot to `path` (memvisor.snapshot.writer: a temporary file renamed
    over `path` once complete). On too little space or an I/O error nothing is left at `path` but what was
    there and the error is raised (SnapshotWriteError, a MemvisorError); the machine is unharmed (still
    paused)."""
    unsupported = unsupported_devices(machine)
    if unsupported:
        raise MemvisorError(
            f"snapshots do not cover {', '.join(unsupported)} yet: snapshot a machine without --device"
        )
    from memvisor.snapshot.writer import write_snapshot

    started = time.monotonic()
    with quiesced(machine):
        state = capture_machine(machine)
        regions = saved_regions(machine)
        total = sum(region.size for region in regions)
        free = hinted_free(machine, regions)
        written = write_snapshot(path, encode(state), regions, _ByteCounter(progress, total), free)
    return SaveResult(path, written.bytes_written, total, written.file_size, written.allocated,
                      time.monotonic() - started, written.free_skipped)  # fmt: skip


def hinted_free(machine: Machine, regions: list[MemoryRegion]) -> dict[str, np.ndarray]:
    """Per region name, the pages the guest hinted free in the balloon's latest free page hint round and did
    not write since: what the snapshot leaves out (they restore as zeros, which the guest does not rely on:
    virtio 1.2 section 5.5.6.8.2, hinted pages may hold anything afterwards unless the guest writes them).

    Only hints judged against the dirty log are used: KVM logged the guest's writes (and memvisor's own
    writes to guest memory) from before the round's command id reached the guest (BalloonAdapter.hint_start),
    and the log still runs; the writes logged so far are applied first, so a page written after its hint is
    saved. None with a page poison value (a skipped page would come back as zeros, not the poison), nor
    when the log cannot be read. Called with the machine quiesced: no write can come after the look."""
    if not machine.dirty_logging:
        return {}
    import numpy as np

    for attached in machine.devices:
        device = attached.device
        if not isinstance(device, BalloonDevice) or device.hint_state is HintState.IDLE:
            continue
        if device.poison_active or device.hinting.dirty_source is None:
            return {}
        try:
            device.clear_hinted(machine.dirty_pages())
        except Exception as error:  # the log is lost: no hint can be trusted (the device drops them too)
            log.warning("the dirty log could not be read (%s): hinted pages are saved", error)
            device.clear_hinted([(0, 1 << 52)])
            return {}
        hinted = device.hinted_pages()
        masks: dict[str, np.ndarray] = {}
        for region in regions:
            first, pages = region.gpa // fileformat.PAGE_SIZE, region.size // fileformat.PAGE_SIZE
            mask = np.zeros(pages, dtype=bool)
            part = hinted[first : first + pages]
            mask[: part.size] = part
            masks[region.name] = mask
        return masks
    return {}


def check_fits(state: MachineState, machine: Machine) -> None:
    """Refuse a state saved from another machine than the one the restore command line built."""
    config = machine.config
    if state.memory != config.memory:
        raise StateError(f"machine.memory: the snapshot has {state.memory >> 20}M of RAM, this command line "
                         f"{config.memory >> 20}M: give --memory {state.memory >> 20}M")  # fmt: skip
    if state.vcpus != config.vcpus:
        raise StateError(f"machine.vcpus: the snapshot has {state.vcpus} vCPUs, this command line {config.vcpus}: "
                         f"give --vcpus {state.vcpus}")  # fmt: skip
    if state.numa_nodes != config.numa_nodes:
        raise StateError(f"machine.numa_nodes: the snapshot has {state.numa_nodes} NUMA nodes, this command line "
                         f"{config.numa_nodes}: give --numa-nodes {state.numa_nodes}")  # fmt: skip
    if list(state.devices) != list(config.extra_devices):
        shown = " ".join(f"--device {d}" for d in state.devices) or "no --device"
        raise StateError(f"machine.devices: the snapshot was taken with {shown}: give the same devices")


def restore_snapshot(machine: Machine, path: Path, progress: Progress | None = None) -> MachineState:
    """Load the snapshot at `path` into `machine`, built from the same command line and never started.

    Everything is checked before KVM is touched; an error raises StateError (or MemvisorError for I/O) and
    the caller closes the machine."""
    if machine.vcpus:
        raise MemvisorError("restore needs a machine whose vCPUs were not created yet")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise MemvisorError(f"cannot open snapshot {path}: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MemvisorError(f"snapshot {path} is not a regular file: give the file `migrate file:` wrote")
        raw_machine, image = fileformat.read_header_and_state(fd)
        state = decode(MachineState, raw_machine, "machine")
        check_fits(state, machine)
        regions = saved_regions(machine)
        if [(r.name, r.gpa, r.size) for r in regions] != [(i.name, i.gpa, i.size) for i in image.regions]:
            raise StateError("memory.regions: the snapshot's memory layout differs from this machine's: give the "
                             "same --memory and devices as when it was saved")  # fmt: skip
        _check_devices(machine, state)
        total = sum(region.pages for region in image.regions) * fileformat.PAGE_SIZE
        advance = _ByteCounter(progress, total)
        _restore_plugged_blocks(machine, state)  # virtio-mem: unplugged blocks are inaccessible until plugged
        for position, (region, region_image) in enumerate(zip(regions, image.regions, strict=True)):
            load_region(fd, region, region_image, f"memory.regions[{position}]", advance)
    except OSError as error:  # an I/O error reading the file (a bad disk, a network filesystem gone)
        raise MemvisorError(f"reading snapshot {path} failed: {error.strerror or error}") from None
    finally:
        os.close(fd)
    _load_state(machine, state)
    return state


def _restore_plugged_blocks(machine: Machine, state: MachineState) -> None:
    """virtio-mem bitmaps (and with them the host mapping of plugged blocks) before RAM is loaded into them."""
    for attached, device_state in zip(machine.devices, state.devices_state, strict=True):
        if device_state.mem is not None:
            restore_mem(attached.device, device_state.mem)


def _check_devices(machine: Machine, state: MachineState) -> None:
    """The device states against this machine's devices, before anything is loaded."""
    from memvisor.virtio.state import check_queue

    transport = machine.agent_transport
    pairs = [(transport, state.agent_transport, "machine.agent_transport")]
    for position, (attached, device_state) in enumerate(zip(machine.devices, state.devices_state, strict=True)):
        where = f"machine.devices_state[{position}]"
        if (device_state.id, device_state.type) != (attached.id, attached.spec.type):
            raise StateError(f"{where}: the snapshot has {device_state.type} {device_state.id} here, the command "
                             f"line {attached.spec.type} {attached.id}: give the same devices in the same order")  # fmt: skip
        if device_state.pmem is not None:
            check_pmem(attached.device, device_state.pmem, f"{where}.pmem")
        if device_state.mem is not None:
            check_mem(attached.device, device_state.mem, f"{where}.mem")
        if device_state.balloon is not None:
            _check_balloon(machine, attached.device, device_state, f"{where}.balloon")
        pairs.append((attached.transport, device_state.transport, f"{where}.transport"))
    for transport, transport_state, where in pairs:
        if transport_state.device_id != transport.device.device_id:
            raise StateError(f"{where}.device_id: {transport_state.device_id} is not this slot's device")
        if len(transport_state.queues) != len(transport.queues):
            raise StateError(f"{where}.queues: {len(transport_state.queues)} queues, the device has {len(transport.queues)}")
        for queue, queue_state in zip(transport.queues, transport_state.queues, strict=True):
            check_queue(queue, queue_state, f"{where}.queues[{queue.index}]")


def _check_balloon(machine: Machine, device: BalloonDevice, state: DeviceState, where: str) -> None:
    assert state.balloon is not None
    transport = state.transport
    index = stats_queue_index(device, transport.driver_features)
    in_flight = {head for head, _ in transport.queues[index].in_flight} if index is not None and index < len(
        transport.queues) else set()  # fmt: skip
    driver_ok = bool(transport.status & STATUS_DRIVER_OK) and not transport.needs_reset
    check_balloon(device, machine.memory, state.balloon, driver_ok, in_flight, where)


def _load_state(machine: Machine, state: MachineState) -> None:
    restore_vm(machine.vm, state.vm)  # interrupt controllers and PIT; the clock is set again last
    for cpu in state.cpus:
        vcpu = machine.vm.create_vcpu(cpu.index)
        machine.vcpus.append(vcpu)
        restore_vcpu(vcpu, cpu)
    restore_serial(machine.com1, state.com1)
    restore_serial(machine.com2, state.com2)
    restore_rtc(machine.rtc, state.rtc)
    restore_i8042(machine.i8042, state.i8042)
    restore_console(machine.agent_console, state.agent_console)
    restore_transport(machine.agent_transport, state.agent_transport, "machine.agent_transport")
    for position, (attached, device_state) in enumerate(zip(machine.devices, state.devices_state, strict=True)):
        if device_state.pmem is not None:
            restore_pmem(attached.device, device_state.pmem)
        if device_state.mem is not None:
            restore_mem(attached.device, device_state.mem)
        restore_transport(attached.transport, device_state.transport, f"machine.devices_state[{position}].transport")
        if device_state.balloon is not None:
            restore_balloon(attached.device, device_state.balloon)  # after activation sized its bitmaps
    machine.agent_on_com2 = state.agent_on_com2
    if state.agent_ready:
        machine.agent.mark_ready()
    machine.before_first_run(lambda: _start_clocks(machine, state))


def _start_clocks(machine: Machine, state: MachineState) -> None:
    """Each vCPU's TSC and TSC deadline, then the VM clock: the guest's time goes on from here, when its vCPUs
    are about to run, not from when the state was loaded (memvisor.snapshot.cpu says why)."""
    for vcpu, cpu in zip(machine.vcpus, state.cpus, strict=True):
        restore_vcpu_clock(vcpu, cpu)
    machine.vm.set_clock(resume_clock(machine, state))
    signal_paused(machine)


def resume_clock(machine: Machine, state: MachineState) -> int:
    """The kvmclock to resume at: KVM_GET_CLOCK's saved value when KVM said it is the guest's own (TSC-stable),
    else what the guest's pvclock page gives for the first vCPU's saved TSC (memvisor.snapshot.pvclock says why)."""
    from memvisor.kvm.structs import KVM_CLOCK_TSC_STABLE
    from memvisor.snapshot.cpu import MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW
    from memvisor.snapshot.pvclock import guest_clock_ns

    if state.vm.clock_flags & KVM_CLOCK_TSC_STABLE or not state.cpus:
        return state.vm.clock
    msrs = state.cpus[0].msr_dict
    if MSR_KVM_SYSTEM_TIME_NEW not in msrs or MSR_IA32_TSC not in msrs:
        return state.vm.clock
    guest = guest_clock_ns(msrs[MSR_KVM_SYSTEM_TIME_NEW], msrs[MSR_IA32_TSC], machine.memory.read)
    if guest is None:
        return state.vm.clock
    log.info("restore: kvmclock %d ns from the guest's pvclock page (KVM's saved count: %d ns, %+.3f s)",
             guest, state.vm.clock, (state.vm.clock - guest) / 1e9)  # fmt: skip
    return guest


def correct_guest_clock(machine: Machine, timeout: float = 60.0) -> threading.Thread:
    """After a restore the guest's clocks resume where they stopped (kvmclock and the TSC are restored as
    saved, as QEMU does, so timers keep their relative deadlines); its wall clock is then behind by the time
    the snapshot sat on disk. Set it from the host through the guest agent, like QEMU's guest-set-time, in
    a daemon thread (the first agent command of the restored guest)."""

    def run() -> None:
        try:
            result = machine.agent.exec(f"date -u -s @{round(time.time())} >/dev/null", timeout)
        except MemvisorError as error:
            log.warning("could not correct the restored guest's wall clock: %s", error)
            return
        if result.status != 0:
            log.warning("the restored guest's `date -s` failed (%d): %s", result.status, result.stderr[:200])

    thread = threading.Thread(target=run, name="clock-correction", daemon=True)
    thread.start()
    return thread
