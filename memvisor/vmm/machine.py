"""A running virtual machine: KVM objects, guest memory, devices on the port and MMIO buses, vCPU threads.

Lifecycle: `Machine(config)` builds everything (nothing runs yet); `start()` starts one thread per vCPU;
`wait()` blocks until the guest powers off, resets (with --reboot exit), panics or `stop()` is called, and
returns why. Device emulation runs on the vCPU thread that exited; devices get callbacks, never KVM handles.
`pause()` parks every vCPU thread (the guest is frozen, devices still answer the host) until `resume()`.
With MEMVISOR_IOEVENTFD=1 (experimental, memvisor/vmm/ioeventfd.py) virtio queue notifies run on a device-event
thread instead and virtio interrupts go through irqfds.
"""

import collections
import contextlib
import ctypes
import enum
import errno
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memvisor.boot import cpu, layout
from memvisor.devices.acpi_pm import AcpiPowerManagement
from memvisor.devices.console import VirtioConsoleDevice
from memvisor.devices.i8042 import I8042
from memvisor.devices.rtc import CmosRtc
from memvisor.devices.serial import Serial16550
from memvisor.errors import MemvisorError
from memvisor.kvm import structs
from memvisor.kvm.ioctls import KvmIoctlError
from memvisor.kvm.system import Kvm, MemorySlot, Vcpu, Vm
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio.mmio import MMIO_WINDOW_SIZE, VirtioMmioTransport
from memvisor.vmm.agent import GuestAgent
from memvisor.vmm.config import MachineConfig
from memvisor.vmm.console import Console
from memvisor.vmm.dirty_log import PageMask
from memvisor.vmm.dirty_tracker import DirtyConsumer, DirtyTracker
from memvisor.vmm.exit_trail import SYNC_CLASSES, ExitTrail, page_walk_lines
from memvisor.vmm.ioeventfd import DeviceEvents, requested

# The kernel loader and the ACPI tables only boot a guest: a restore (memvisor/vmm/snapshot.py) needs neither, and
# each module imported costs tens of milliseconds of start-up in the lab (BENCHMARKS.md). load() imports them.
if TYPE_CHECKING:
    from memvisor.boot.acpi.tables import NumaMemory

KICK_SIGNAL = signal.SIGUSR1
CONSOLE_TAIL_LINES = 20  # console lines a triple fault's report carries


class StopReason(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    PANIC = "panic"
    QUIT = "quit"
    ERROR = "error"


@dataclass
class Outcome:
    reason: StopReason
    message: str = ""
    cause: str = ""  # for a reset: what asked for it (a triple fault, the i8042, ACPI, QMP)
    console_tail: tuple[str, ...] = ()  # for a triple fault: the guest console's last lines before it
    page_walk: tuple[str, ...] = ()  # for a triple fault: its page tables walked from the last CR3 (page_walk.py)


PortRead = Callable[[int], int]
PortWrite = Callable[[int, int], None]


class PortBus:
    """Port I/O handlers by port number; unclaimed ports read as all ones and ignore writes."""

    def __init__(self) -> None:
        self._read: dict[int, PortRead] = {}
        self._write: dict[int, PortWrite] = {}

    def add(
        self, base: int, length: int, read: Callable[[int], int], write: Callable[[int, int], None]
    ) -> None:
        """Ports base..base+length-1; the handlers get the offset from `base`."""

        def read_at(port: int) -> int:
            return read(port - base)

        def write_at(port: int, value: int) -> None:
            write(port - base, value)

        for port in range(base, base + length):
            self._read[port] = read_at
            self._write[port] = write_at

    def add_ports(self, ports: list[int], read: PortRead, write: PortWrite) -> None:
        for port in ports:
            self._read[port] = read
            self._write[port] = write

    def read(self, port: int, size: int) -> int:
        handler = self._read.get(port)
        if handler is None or size != 1:
            return (1 << (8 * size)) - 1
        return handler(port) & 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        handler = self._write.get(port)
        if handler is not None and size == 1:
            handler(port, value & 0xFF)


class MmioDevice(Protocol):
    """What an MMIO window needs: byte-level reads and writes at an offset."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


def _ignore_signal(signum: int, frame: object) -> None:
    """The kick signal only interrupts KVM_RUN; it needs a handler (SIG_IGN would not interrupt)."""


class Machine:
    """One VM. Build it, `start()`, then `wait()`."""

    device_events: DeviceEvents | None = None  # the opt-in eventfd fast path (MEMVISOR_IOEVENTFD=1)

    def __init__(self, config: MachineConfig, console_fd: int | None = None) -> None:
        config.validate()
        eventfds = requested()  # MEMVISOR_IOEVENTFD, checked before anything is made
        self.config = config
        self.kvm = Kvm()
        self.vm: Vm = self.kvm.create_vm()
        self.memory = GuestMemory()
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self._outcome: Outcome | None = None
        self._done = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._pause_requested = False  # read by the vCPU threads only after KVM_EXIT_INTR
        self._held = False  # a migration throttle's slice: parked too, but the machine is not paused
        self._parked = 0  # vCPU threads waiting in _park
        self._outcome_listeners: list[Callable[[Outcome], None]] = []
        self._vcpu_states: dict[int, str] = {}
        self._before_first_run: list[Callable[[], None]] = []  # see before_first_run
        self._trails: dict[int, ExitTrail] = {}  # each vCPU's previous exit (KVM_CAP_SYNC_REGS), by index
        self.boot_started = 0.0
        self.ports = PortBus()
        self.mmio: list[tuple[int, int, MmioDevice]] = []
        self.virtio_slots: list[tuple[int, int]] = []  # (base, GSI) of each virtio-mmio device, for the DSDT
        self._next_slot = 0

        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        if eventfds:
            self.device_events = DeviceEvents(self.vm)
        for index, (gpa, size) in enumerate(layout.ram_ranges(config.memory)):
            region = MemoryRegion.memfd(gpa, size, f"ram{index}", config.memory_backend)
            self.memory.add(region)
            self.vm.set_memory_slot(index, gpa, size, region.host_addr)
        self._next_memslot = len(self.memory.regions)

        self.console = Console(console_fd if console_fd is not None else 1, self._on_panic)
        self.com1 = Serial16550(self.console.write, lambda level: self.vm.irq_line(layout.COM1_GSI, level))
        # The guest agent talks over a virtio-console (/dev/hvc0: whole buffers per exit) on the first virtio
        # slot, allocated before the user's devices so it keeps its place; COM2 (/dev/ttyS1, one exit per
        # byte) is the fallback for a guest without the driver. Answers go where the agent last spoke.
        self.agent = GuestAgent(self._agent_send)
        self._agent_on_com2 = False
        self.agent_console = VirtioConsoleDevice(functools.partial(self._agent_output, False))
        base, gsi = self.allocate_virtio_slot()
        transport = VirtioMmioTransport(self.agent_console, self.memory, self.virtio_interrupt(gsi))
        self.agent_transport = transport  # for snapshots (memvisor/vmm/snapshot.py)
        self.add_virtio_window(base, transport)
        self.com2 = Serial16550(
            functools.partial(self._agent_output, True), lambda level: self.vm.irq_line(layout.COM2_GSI, level)
        )
        self.ports.add(layout.COM1_PORT, 8, self.com1.read, self.com1.write)
        self.ports.add(layout.COM2_PORT, 8, self.com2.read, self.com2.write)
        rtc = self.rtc = CmosRtc()
        self.ports.add(layout.RTC_PORT, 2, rtc.read, rtc.write)
        i8042 = self.i8042 = I8042(
            functools.partial(self.request_reset, "the guest pulsed the reset line (i8042 command 0xfe)")
        )
        self.ports.add(layout.I8042_DATA_PORT, 1, i8042.read, i8042.write)
        self.ports.add(layout.I8042_COMMAND_PORT, 1, lambda o: i8042.read(4), lambda o, v: i8042.write(4, v))
        pm = AcpiPowerManagement(
            self.request_poweroff, functools.partial(self.request_reset, "the guest wrote the ACPI reset register")
        )
        self.ports.add_ports(
            [layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT],
            pm.read,
            pm.write,
        )
        self.vcpus: list[Vcpu] = []
        self.devices: list[Any] = []  # memvisor.vmm.devices.AttachedDevice, set by attach_devices

    # Devices.
    @property
    def agent_on_com2(self) -> bool:
        """Whether the guest agent last spoke on COM2 (else on the hvc console): where its requests go."""
        return self._agent_on_com2

    @agent_on_com2.setter
    def agent_on_com2(self, on_com2: bool) -> None:
        self._agent_on_com2 = on_com2

    def _agent_output(self, on_com2: bool, data: bytes) -> None:
        self._agent_on_com2 = on_com2
        self.agent.on_output(data)

    def _agent_send(self, data: bytes) -> None:
        if self._agent_on_com2:
            self.com2.feed(data)
        else:
            self.agent_console.send(data)

    def add_mmio(self, base: int, size: int, device: MmioDevice) -> None:
        self.mmio.append((base, size, device))

    def allocate_virtio_slot(self) -> tuple[int, int]:
        """The next free virtio-mmio slot: (base address, GSI)."""
        if self._next_slot >= layout.VIRTIO_MMIO_SLOTS:
            raise MemvisorError(f"too many virtio devices: at most {layout.VIRTIO_MMIO_SLOTS}")
        base, gsi = layout.virtio_mmio_slot(self._next_slot)
        self._next_slot += 1
        self.virtio_slots.append((base, gsi))
        return base, gsi

    def virtio_interrupt(self, gsi: int) -> Callable[[], None]:
        """What a virtio transport on `gsi` calls to raise its interrupt: `pulse_irq`, or with the eventfd fast
        path a write to the GSI's irqfd (the same edge, made by KVM)."""
        if self.device_events is None:
            return functools.partial(self.pulse_irq, gsi)
        return self.device_events.interrupt(gsi)

    def add_virtio_window(self, base: int, transport: VirtioMmioTransport) -> None:
        """Put a virtio-mmio transport on the MMIO bus at `base` (behind its ioeventfds with the fast path)."""
        window = transport if self.device_events is None else self.device_events.window(base, transport)
        self.add_mmio(base, MMIO_WINDOW_SIZE, window)

    def pulse_irq(self, gsi: int) -> None:
        """An edge on `gsi` (virtio-mmio interrupts are edge-triggered, active high in the DSDT)."""
        self.vm.irq_line(gsi, 1)
        self.vm.irq_line(gsi, 0)

    def add_memory_region(self, region: MemoryRegion, *, readonly: bool = False) -> int:
        """Add a region to guest memory and to KVM; returns its memory slot."""
        self.memory.add(region)
        slot = self._next_memslot
        self._next_memslot += 1
        flags = structs.KVM_MEM_READONLY if readonly else 0
        self.vm.set_memory_slot(slot, region.gpa, region.size, region.host_addr, flags)
        return slot

    # Boot.
    def load(self) -> None:
        from memvisor.boot.acpi.tables import VirtioMmioSlot, build_acpi_tables
        from memvisor.vmm.loader import load_kernel, read_kernel

        image = read_kernel(self.config.kernel)
        acpi = build_acpi_tables(
            self.config.vcpus,
            [(layout.COM1_PORT, layout.COM1_GSI), (layout.COM2_PORT, layout.COM2_GSI)],
            [VirtioMmioSlot(base, gsi) for base, gsi in self.virtio_slots],
            numa_nodes=self.config.numa_nodes,
            numa_memory=self._numa_memory(),
        )
        loaded = load_kernel(
            self.memory, image, self.config.initrd, self.config.cmdline, self.config.memory, acpi
        )
        supported = self.kvm.supported_cpuid()
        for index in range(self.config.vcpus):
            vcpu = self.vm.create_vcpu(index)
            cpu.setup_vcpu(vcpu, supported, self.config.vcpus, loaded.entry_point)
            self.vcpus.append(vcpu)

    def _numa_memory(self) -> "list[NumaMemory]":
        """Boot RAM on node 0; each virtio-mem region on its device's node (hotpluggable)."""
        from memvisor.boot.acpi.tables import NumaMemory

        ranges = [NumaMemory(gpa, size, 0) for gpa, size in layout.ram_ranges(self.config.memory)]
        for attached in self.devices:
            if attached.spec.type == "virtio-mem" and attached.region is not None:
                node = int(attached.spec.properties["node"])
                ranges.append(NumaMemory(attached.region.gpa, attached.region.size, node, hotpluggable=True))
        return ranges

    def before_first_run(self, step: Callable[[], None]) -> None:
        """Run `step` in start(), right before the vCPU threads start (a restore sets the guest's clocks there)."""
        self._before_first_run.append(step)

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, _ignore_signal)
        self.boot_started = time.monotonic()
        steps, self._before_first_run = self._before_first_run, []
        for step in steps:
            step()
        for vcpu in self.vcpus:
            classes = vcpu.enable_sync_regs(SYNC_CLASSES)  # 0 without KVM_CAP_SYNC_REGS: then no trail
            if classes:
                self._trails[vcpu.index] = ExitTrail(vcpu.run_address, classes)
        if self.device_events is not None:
            self.device_events.start()
        for vcpu in self.vcpus:
            thread = threading.Thread(
                target=self._vcpu_loop, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    # Ending.
    def _finish(self, outcome: Outcome) -> None:
        with self._done:
            if self._outcome is None:
                self._outcome = outcome
                self._stopping = True
                for listener in self._outcome_listeners:
                    with contextlib.suppress(Exception):
                        listener(outcome)
                self._done.notify_all()
        self.agent.abort(_describe_outcome(outcome))
        self._kick_all()

    def request_poweroff(self) -> None:
        self._finish(Outcome(StopReason.POWEROFF))

    def request_reset(
        self, cause: str = "the host asked for it (QMP system_reset)", *, console_tail: tuple[str, ...] = (),
        page_walk: tuple[str, ...] = (),
    ) -> None:
        if self.console.panicked:
            return  # panic=-1 resets right after the panic; the panic is what ended the guest
        self._finish(Outcome(StopReason.RESET, "the guest rebooted", cause, console_tail, page_walk))

    def _on_triple_fault(self, vcpu: Vcpu) -> None:
        """KVM_EXIT_SHUTDOWN: a reset (as QEMU does: SHUTDOWN_CAUSE_GUEST_RESET) whose cause names where the
        vCPU last was. The registers readable now are already the reset state on AMD; the trail kept the exit
        before this one (memvisor/vmm/exit_trail.py)."""
        cause = f"triple fault on vCPU {vcpu.index} (KVM_EXIT_SHUTDOWN)"
        trail = self._trails.get(vcpu.index)
        last = trail.describe() if trail is not None else None
        if last is not None:
            cause += f"; its last exit before it: {last}"
        walk = page_walk_lines(self.memory, trail, self._trails) if trail is not None else ()
        self.request_reset(cause, console_tail=self.console.tail(CONSOLE_TAIL_LINES), page_walk=walk)

    def vcpu_states(self) -> list[str]:
        """After a reset or an error: each vCPU's registers as it left KVM_RUN (one line each, vCPU order).

        Each vCPU thread records its own on the way out (reading them from another thread would wait for
        that vCPU's KVM_RUN to end, which a wedged vCPU never does)."""
        return [self._vcpu_states[index] for index in sorted(self._vcpu_states)]

    def _on_panic(self, message: str) -> None:
        self._finish(Outcome(StopReason.PANIC, message))

    def stop(self, message: str = "stopped by request") -> None:
        self._finish(Outcome(StopReason.QUIT, message))

    def _kick_all(self) -> None:
        for vcpu, thread in zip(self.vcpus, self._threads, strict=False):
            vcpu.run_struct.immediate_exit = 1
            if thread.ident is not None and thread.is_alive() and thread is not threading.current_thread():
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)

    @property
    def outcome(self) -> Outcome | None:
        """Why the machine ended, None while it runs (or has not started)."""
        return self._outcome

    def add_outcome_listener(self, listener: Callable[[Outcome], None]) -> None:
        """Call `listener(outcome)` once, when the machine ends (under its lock, on the ending thread: be quick)."""
        self._outcome_listeners.append(listener)

    def vcpu_threads(self) -> list[threading.Thread]:
        """The vCPU threads in vCPU order (empty before `start()`)."""
        return list(self._threads)

    # Pausing: the vCPU loop looks at _pause_requested (and _held) only after KVM_EXIT_INTR, which a kick forces.
    @property
    def paused(self) -> bool:
        """True while a pause is in force (requested by `pause()`, not yet lifted by `resume()`); a `hold` is
        not a pause."""
        return self._pause_requested

    def hold(self, timeout: float = 5.0) -> bool:
        """Park every vCPU for a moment without pausing the machine (memvisor/migration/throttle.py: it still
        reads as running, and a `pause`/`resume` in between stays the user's); False if some did not park."""
        with self._done:
            self._held = True
        self._kick_all()
        with self._done:
            return self._done.wait_for(lambda: self._parked >= len(self._threads) or self._stopping, timeout)

    def release(self) -> None:
        """End a `hold`: the vCPUs run again unless the machine is paused."""
        with self._done:
            self._held = False
            self._done.notify_all()

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop every vCPU and wait until all are parked; False if some did not park within `timeout`."""
        with self._done:
            self._pause_requested = True
        self._kick_all()
        with self._done:
            parked = self._done.wait_for(lambda: self._parked >= len(self._threads) or self._stopping, timeout)
        if parked and self.device_events is not None:  # the notifies the guest made before it parked: handled
            parked = self.device_events.flush(timeout)
        if parked and not self._stopping:
            for vcpu in self.vcpus:  # KVM_KVMCLOCK_CTRL: the guest will not take the pause for a soft lockup
                with contextlib.suppress(KvmIoctlError):
                    vcpu.kvmclock_ctrl()
        return parked

    def resume(self) -> None:
        """Let the parked vCPUs run again."""
        with self._done:
            self._pause_requested = False
            self._done.notify_all()

    def _park(self) -> None:
        with self._done:
            self._parked += 1
            self._done.notify_all()
            self._done.wait_for(lambda: not (self._pause_requested or self._held) or self._stopping)
            self._parked -= 1

    def wait(self, timeout: float | None = None) -> Outcome | None:
        with self._done:
            self._done.wait_for(lambda: self._outcome is not None, timeout)
            outcome = self._outcome
        if outcome is not None:
            for thread in self._threads:
                thread.join(timeout=5)
        return outcome

    def close(self) -> None:
        if self.device_events is not None:  # no notify handler runs while the devices close
            self.device_events.close()
        for attached in self.devices:
            closer = getattr(attached.device, "close", None) or attached.device.reset
            with contextlib.suppress(Exception):
                closer()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        self.vm.close()
        self.kvm.close()
        self.memory.close()

    # Dirty page logging: one tracker, a bitmap per consumer (free page hinting, migration); see
    # memvisor/vmm/dirty_tracker.py.
    _dirty_tracker: DirtyTracker | None = None
    _hint_log: DirtyConsumer | None = None

    @property
    def dirty_tracker(self) -> DirtyTracker:
        """The tracker over every RAM and virtio-mem memslot (not pmem), made on first use; it also sees the
        VMM's own writes to guest memory (GuestMemory.on_write)."""
        if self._dirty_tracker is None:
            self._dirty_tracker = DirtyTracker(self.vm, self._tracks_slot)
            self.memory.on_write = self._dirty_tracker.mark
        return self._dirty_tracker

    def _tracks_slot(self, slot: MemorySlot) -> bool:
        return any(region.host_addr == slot.userspace_addr and not region.name.startswith("pmem-")
                   and not region.readonly for region in self.memory.regions)  # fmt: skip

    @property
    def dirty_logging(self) -> bool:
        """True while free page hinting's consumer of the dirty log is subscribed."""
        return self._hint_log is not None

    def start_dirty_log(self) -> None:
        """Subscribe free page hinting to the dirty log (KVM logs writes); a no-op if it is already."""
        if self._hint_log is None:
            self._hint_log = self.dirty_tracker.subscribe("free-page-hinting")

    def dirty_pages(self) -> PageMask:
        """Pages written since the previous call (or `start_dirty_log()`): bool array by guest PFN."""
        if self._hint_log is None:
            import numpy as np

            return np.zeros(self.dirty_tracker.pfn_limit, dtype=bool)
        return self._hint_log.take_mask()

    def dirty_pfns(self, first_pfn: int = 0, count: int = 0) -> PageMask:
        """The same as `dirty_pages()` as a sorted array of PFNs; with `count`, the caller is about to rely on
        those pages being unwritten (a free page hint): see DirtyConsumer.take_pfns_claiming."""
        if self._hint_log is None:
            import numpy as np

            return np.zeros(0, dtype=np.int64)
        if count > 0:
            return self._hint_log.take_pfns_claiming(first_pfn, count)
        return self._hint_log.take_pfns()

    def stop_dirty_log(self) -> None:
        """Unsubscribe free page hinting (KVM stops logging when no other consumer remains)."""
        if self._hint_log is not None:
            self._hint_log.close()
            self._hint_log = None

    # The vCPU loop: the hot path; every exit here costs a trip through Python.
    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        run = vcpu.run_struct
        exit_union = run.exit
        counts = self.exit_counts
        ports = self.ports
        # The exit trail: a copy of kvm_run's head and sync regs, and a clock read, per exit (exit_trail.py).
        trail = self._trails.get(vcpu.index)
        now_ns = time.monotonic_ns
        try:
            if self._pause_requested or self._held:
                self._park()  # paused before it ever ran
            while not self._stopping:
                reason = vcpu.run()
                if reason == structs.KVM_EXIT_IO:
                    io = exit_union.io
                    port, size, count = io.port, io.size, io.count
                    counts[f"io {port:#x}"] += 1
                    data = vcpu.io_data(size * count)
                    for item in range(count):
                        if io.direction == structs.KVM_EXIT_IO_OUT:
                            value = int.from_bytes(bytes(data[item * size : (item + 1) * size]), "little")
                            ports.write(port, size, value)
                        else:
                            value = ports.read(port, size)
                            data[item * size : (item + 1) * size] = list(value.to_bytes(size, "little"))
                elif reason == structs.KVM_EXIT_MMIO:
                    self._handle_mmio(exit_union.mmio)
                elif reason == structs.KVM_EXIT_INTR:
                    run.immediate_exit = 0 if not self._stopping else 1
                    if self._pause_requested or self._held:  # after clearing immediate_exit: no kick is lost
                        self._park()
                elif reason == structs.KVM_EXIT_SHUTDOWN:
                    self._on_triple_fault(vcpu)
                elif reason == structs.KVM_EXIT_SYSTEM_EVENT:
                    event = exit_union.system_event.type
                    if event == structs.KVM_SYSTEM_EVENT_SHUTDOWN:
                        self.request_poweroff()
                    elif event == structs.KVM_SYSTEM_EVENT_RESET:
                        self.request_reset(f"KVM system event reset on vCPU {vcpu.index}")
                    else:
                        self._on_panic(f"KVM system event {event}")
                elif reason == structs.KVM_EXIT_HLT:
                    time.sleep(0.001)
                else:
                    self._finish(Outcome(StopReason.ERROR, self._describe_exit(vcpu, reason)))
                if trail is not None:  # after handling: at the next exit this is the one before it
                    trail.view[:] = trail.source
                    trail.at_ns = now_ns()
        except KvmIoctlError as error:
            self._finish(Outcome(StopReason.ERROR, self._describe_run_error(vcpu, error)))
        outcome = self._outcome
        if outcome is not None and outcome.reason in (StopReason.RESET, StopReason.ERROR):
            self._vcpu_states[vcpu.index] = describe_registers(vcpu)

    def _handle_mmio(self, mmio: structs.KvmRunMmio) -> None:
        address, length = mmio.phys_addr, min(mmio.len, 8)
        self.exit_counts["mmio"] += 1
        for base, size, device in self.mmio:
            if base <= address < base + size:
                if mmio.is_write:
                    device.write(address - base, bytes(mmio.data[:length]))
                else:
                    data = device.read(address - base, length)
                    ctypes.memmove(ctypes.addressof(mmio.data), data, min(len(data), length))
                return
        if not mmio.is_write:
            ctypes.memset(ctypes.addressof(mmio.data), 0xFF, length)

    def _describe_run_error(self, vcpu: Vcpu, error: KvmIoctlError) -> str:
        """Why KVM_RUN failed. EFAULT: the guest touched memory the host keeps inaccessible (unplugged virtio-mem)."""
        if error.errno != errno.EFAULT:
            return f"vCPU {vcpu.index}: {error.strerror}"
        try:
            rip = vcpu.get_regs().rip
        except KvmIoctlError:
            rip = 0
        return (f"vCPU {vcpu.index} touched guest memory the host does not back (at rip {rip:#x}): an unplugged "
                "virtio-mem block, which the driver must never access; the VM was stopped. Use a guest whose "
                "virtio-mem driver negotiates VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (Linux 5.16 or later)")

    def _describe_exit(self, vcpu: Vcpu, reason: int) -> str:
        detail = ""
        if reason == structs.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {vcpu.run_struct.exit.internal.suberror})"
        elif reason == structs.KVM_EXIT_FAIL_ENTRY:
            detail = f" (hardware reason {vcpu.run_struct.exit.fail_entry_reason:#x})"
        try:
            rip = vcpu.get_regs().rip
        except KvmIoctlError:
            rip = 0
        return f"vCPU {vcpu.index} stopped with KVM exit {reason}{detail} at rip {rip:#x}"


def describe_registers(vcpu: Vcpu) -> str:
    """One line with a vCPU's state: where it was, its stack, its mode (for a reset's evidence)."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except KvmIoctlError as error:
        return f"vCPU {vcpu.index}: registers unreadable ({error.strerror})"
    return (
        f"vCPU {vcpu.index}: rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x} rax={regs.rax:#x} "
        f"cs={sregs.cs.selector:#x} cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
        f"efer={sregs.efer:#x} idt={sregs.idt.base:#x}/{sregs.idt.limit:#x}"
    )


def _describe_outcome(outcome: Outcome) -> str:
    if outcome.reason is StopReason.POWEROFF:
        return "the guest powered off"
    if outcome.reason is StopReason.PANIC:
        return f"guest kernel panic: {outcome.message}"
    return outcome.message or f"the guest stopped ({outcome.reason.value})"


def open_console(path: os.PathLike[str] | None) -> int:
    """A file descriptor for the console: the file at `path` (appended), or standard output."""
    if path is None:
        return 1
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
