"""The opt-in fast path of virtio-mmio: queue notifies through KVM_IOEVENTFD, interrupts through KVM_IRQFD.

Experimental, off by default: `MEMVISOR_IOEVENTFD=1` turns it on for a machine (0 or unset: off, the machine is
built exactly as without this module: every QueueNotify is an MMIO exit served on the vCPU thread and every
interrupt two KVM_IRQ_LINE ioctls). With it on:

- Notifies. Each virtio-mmio window gets one eventfd per queue, registered with KVM for a 4-byte write of the
  queue's index to QueueNotify (offset 0x050; without VIRTIO_F_NOTIFICATION_DATA the value written is the
  index, virtio 1.2 section 4.2.2; KVM_IOEVENTFD_FLAG_DATAMATCH on it). Such a write signals the eventfd inside
  KVM, the vCPU goes on without an exit, and the device-event thread (memvisor/vmm/event_loop.py) makes the
  very call the MMIO exit would have made, `transport.write(QUEUE_NOTIFY, index)`, under the same transport
  and device locks. Any other write there (another width, a nonexistent queue) still exits and is ignored.
- When. The ioeventfds are registered only while the driver has DRIVER_OK set: registered by the Status write
  that sets it (on the vCPU thread, before that vCPU runs on) or when a restored machine starts, removed by the
  write of 0 that resets the device (and a notify still pending in an eventfd is dropped then). So a notify
  before DRIVER_OK exits to Python and is ignored as before, and one after a reset is too. Between a notify
  and its handling the transport's own checks run as on the exit path (the device active, the queue ready), so
  a notify of a device that failed meanwhile (DEVICE_NEEDS_RESET) is ignored the same way.
- Interrupts. One eventfd per virtio GSI, registered with KVM_IRQFD without KVM_IRQFD_FLAG_RESAMPLE: a write
  makes KVM set the line and clear it again, exactly the edge `Machine.pulse_irq` makes with two KVM_IRQ_LINE
  calls (both use KVM's userspace IRQ source). An edge is what the DSDT declares for these lines (Interrupt(,
  Edge, ActiveHigh) in memvisor/boot/acpi/tables.py); the InterruptStatus/InterruptACK registers keep working
  as before because the transport sets InterruptStatus before raising. A resample fd is what a level-triggered
  line needs (QEMU's INTx: the line stays high until the guest's EOI, then KVM signals the resample fd and the
  VMM re-asserts it if the status is still pending); these lines are not level-triggered, so none is used.
- Pause. `flush` runs every notify signalled before it; Machine.pause calls it once the vCPUs are parked, so a
  snapshot or migration sees every notify the guest made handled, as on the exit path.
- Teardown. `close` stops the thread, removes every ioeventfd and irqfd from KVM and closes the eventfds; a
  guest reboot builds a new machine.

A hostile guest can make the vCPU thread register and remove ioeventfds by toggling DRIVER_OK and reset: a
few ioctls per Status write of its own vCPU, nothing that outlives the machine.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from memvisor.errors import MemvisorError, UsageError
from memvisor.kvm import ioctls
from memvisor.lazylog import lazy_logger
from memvisor.virtio.device import STATUS_DRIVER_OK
from memvisor.virtio.mmio import QUEUE_NOTIFY, STATUS, VirtioMmioTransport

# The device-event thread (and `selectors` under it) only with the fast path on: every machine imports this module
# for `requested`, and in the lab each module costs tens of milliseconds of start-up (BENCHMARKS.md).
if TYPE_CHECKING:
    from memvisor.vmm.event_loop import EventfdLoop

log = lazy_logger(__name__)  # imports logging at its first message

ENV = "MEMVISOR_IOEVENTFD"
NOTIFY_WIDTH = 4  # QueueNotify is a 32-bit register
FLUSH_TIMEOUT = 5.0

_REG = struct.Struct("<I")


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether MEMVISOR_IOEVENTFD asks for the fast path: "1" yes, "0" or unset no, anything else is an error."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise UsageError(f"{ENV}={value!r} is not understood: give {ENV}=1 (notifies and interrupts through eventfds) "
                     f"or 0 (the default)")  # fmt: skip


class EventfdVm(Protocol):
    """The VM ioctls this module uses (memvisor.kvm.system.Vm; a fake in the unit tests)."""

    def check_extension(self, capability: int) -> int: ...

    def ioeventfd(
        self, fd: int, address: int, length: int, datamatch: int | None, *, deassign: bool = False
    ) -> None: ...

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None: ...


class Irqfd:
    """One GSI's irqfd: `raise_irq()` pulses the line from any thread, without an ioctl."""

    def __init__(self, vm: EventfdVm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self._lock = threading.Lock()  # no write after close (the fd number could be reused by then)
        from memvisor.vmm.event_loop import make_eventfd

        self._fd = make_eventfd()
        try:
            vm.irqfd(self._fd, gsi)
        except OSError as error:
            os.close(self._fd)
            raise MemvisorError(
                f"KVM refused an irqfd for GSI {gsi} ({error.strerror}): unset {ENV}"
            ) from None
        self._closed = False
        self.raised = 0

    @property
    def fd(self) -> int:
        return self._fd

    def raise_irq(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.raised += 1
            os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._vm.irqfd(self._fd, self.gsi, deassign=True)
            except OSError as error:
                log.warning("removing the irqfd of GSI %d failed: %s", self.gsi, error)
            os.close(self._fd)


class NotifyWindow:
    """A virtio-mmio window (an MmioDevice for the machine's bus) whose queue notifies arrive through eventfds."""

    def __init__(self, vm: EventfdVm, loop: EventfdLoop, base: int, transport: VirtioMmioTransport) -> None:
        self._vm = vm
        self._loop = loop
        self.base = base
        self.transport = transport
        from memvisor.vmm.event_loop import make_eventfd

        self._fds = [make_eventfd() for _ in transport.queues]
        self._assigned = [False] * len(self._fds)
        self._closed = False
        self.notifies = 0  # notifies that arrived through an eventfd
        for index, fd in enumerate(self._fds):
            loop.add(fd, self._kicked_handler(index))

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._fds)

    @property
    def assigned(self) -> tuple[bool, ...]:
        """Per queue: whether its ioeventfd is registered with KVM now."""
        return tuple(self._assigned)

    def _kicked_handler(self, index: int) -> Callable[[], None]:
        data = _REG.pack(index)

        def kicked() -> None:
            self.notifies += 1
            self.transport.write(QUEUE_NOTIFY, data)  # the same call, and checks, as the MMIO exit's

        return kicked

    # The MmioDevice protocol: the transport's own read and write; a Status write may (de)register.
    def read(self, offset: int, length: int) -> bytes:
        return self.transport.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if offset != STATUS:
            self.transport.write(offset, data)
            return
        with self.transport.lock:  # the RLock the write takes too: no notify is handled in between
            self.transport.write(offset, data)
            self.sync()

    def sync(self) -> None:
        """Register the ioeventfds while the driver has DRIVER_OK set, remove them otherwise (and after close)."""
        with self.transport.lock:
            want = bool(self.transport.driver_status & STATUS_DRIVER_OK) and not self._closed
            for index, fd in enumerate(self._fds):
                if self._assigned[index] != want:
                    self._set(index, fd, want)

    def _set(self, index: int, fd: int, assign: bool) -> None:
        try:
            self._vm.ioeventfd(fd, self.base + QUEUE_NOTIFY, NOTIFY_WIDTH, index, deassign=not assign)
        except OSError as error:
            what = "registering" if assign else "removing"
            log.warning("virtio-mmio at %#x queue %d: %s its ioeventfd failed (%s); its notifies exit to the VMM",
                        self.base, index, what, error)  # fmt: skip
            if assign:
                return  # stays on the MMIO exit path: the same semantics, only slower
        self._assigned[index] = assign
        if not assign:
            from memvisor.vmm.event_loop import take

            take(fd)  # a notify signalled before the reset does not reach the next driver

    def close(self) -> None:
        """Remove the ioeventfds and close the eventfds (the event loop is stopped first)."""
        with self.transport.lock:
            self._closed = True
            self.sync()
            for fd in self._fds:
                self._loop.remove(fd)
                os.close(fd)
            self._fds = []
            self._assigned = []


class DeviceEvents:
    """The fast path for one machine: its irqfds, notify windows and the device-event thread."""

    def __init__(self, vm: EventfdVm) -> None:
        missing = [name for name, cap in (("KVM_CAP_IOEVENTFD", ioctls.KVM_CAP_IOEVENTFD),
                                          ("KVM_CAP_IRQFD", ioctls.KVM_CAP_IRQFD)) if not vm.check_extension(cap)]  # fmt: skip
        if missing:
            raise MemvisorError(
                f"{ENV}=1 needs {' and '.join(missing)}, which this KVM does not report: unset {ENV}"
            )
        self._vm = vm
        from memvisor.vmm.event_loop import EventfdLoop

        self.loop = EventfdLoop("device-events")
        self.irqfds: dict[int, Irqfd] = {}
        self.windows: list[NotifyWindow] = []

    def interrupt(self, gsi: int) -> Callable[[], None]:
        """What a transport calls to raise its interrupt: a write to the irqfd of `gsi` (made on first use)."""
        irqfd = self.irqfds.get(gsi)
        if irqfd is None:
            irqfd = self.irqfds[gsi] = Irqfd(self._vm, gsi)
        return irqfd.raise_irq

    def window(self, base: int, transport: VirtioMmioTransport) -> NotifyWindow:
        """The MMIO window to put on the bus at `base` in front of `transport`."""
        window = NotifyWindow(self._vm, self.loop, base, transport)
        self.windows.append(window)
        return window

    @property
    def notifies(self) -> int:
        """Queue notifies that came through an ioeventfd instead of an MMIO exit."""
        return sum(window.notifies for window in self.windows)

    @property
    def interrupts(self) -> int:
        """Interrupts raised through an irqfd."""
        return sum(irqfd.raised for irqfd in self.irqfds.values())

    def start(self) -> None:
        """Start the device-event thread and register the ioeventfds of the windows already DRIVER_OK (a restore)."""
        self.loop.start()
        for window in self.windows:
            window.sync()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Handle every notify signalled so far (the vCPUs are parked); False if it did not finish in `timeout`."""
        return self.loop.flush(timeout)

    def close(self) -> None:
        """Stop the thread, then remove every ioeventfd and irqfd from KVM and close their eventfds."""
        self.loop.stop()
        for window in self.windows:
            window.close()
        for irqfd in self.irqfds.values():
            irqfd.close()
