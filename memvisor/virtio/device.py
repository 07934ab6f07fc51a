"""The base class of every virtio device model, and the constants shared by devices and transports.

A device model knows its own features, configuration space and request handling; it never sees the
transport registers or KVM. The transport (`memvisor.virtio.mmio`) drives it:

- `device_features()` is offered to the driver; it must include VIRTIO_F_VERSION_1.
- `read_config` / `write_config` serve the device-specific configuration space (virtio 1.2 section 5.x).
- `activate(memory, queues, features)` runs once the driver sets DRIVER_OK, with every queue of
  `queue_max_sizes` (a queue the driver did not set up has `ready` False) and the negotiated features.
- `notify(queue_index)` runs when the driver kicks a queue.
- `reset()` runs when the driver writes 0 to the status register.

Every device takes its requests with `drain(queue, handle)`: one queue's worth of chains per call, each
answered (or kept), one interrupt at the end, and the one policy for malformed chains stated there.

A device raises an interrupt through the callback the transport binds: `signal_used(queue)` after adding
used buffers (it honours the queue's notification suppression when a queue is given) and
`signal_config_change()` after its configuration changed (the transport bumps ConfigGeneration). A device
calls it inside the same `self.lock` section as the change, and serves `read_config` under `self.lock`, so
that no config read sees a new value before the generation moved (virtio 1.2 section 4.2.2.1: a driver
reading a 64-bit field as two 32-bit halves must never accept a torn value).
An exception out of `activate`, `notify` or `write_config` makes the transport set DEVICE_NEEDS_RESET;
work done on another thread reports its failure with `report_failure(error)` instead.

Devices that complete requests from a worker thread hold `self.lock` while they push used buffers and
signal; the transport never calls into a device while holding a lock a device could wait for.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from memvisor.errors import GuestFault
from memvisor.lazylog import lazy_logger
from memvisor.memory.guest_memory import GuestMemoryError
from memvisor.virtio.queue import VirtqueueError

if TYPE_CHECKING:
    from memvisor.memory.guest_memory import GuestMemory
    from memvisor.virtio.queue import DescriptorChain, SplitVirtqueue

log = lazy_logger(__name__)  # imports logging at its first message

# What a request handler given to `VirtioDevice.drain` returns: the bytes written into the chain's
# device-writable buffers (the chain is returned now), or None (the device keeps it and answers later).
Handler = Callable[["DescriptorChain"], "int | None"]

# Reserved feature bits, virtio 1.2 section 6.
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33  # never offered: guest addresses are guest physical addresses
VIRTIO_F_RING_PACKED = 34  # never offered: split rings only

# The features the transport and split virtqueue implement for every device.
TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_INDIRECT_DESC) | (1 << VIRTIO_F_RING_EVENT_IDX)

# Device status bits, virtio 1.2 section 2.1.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Interrupt reasons (the virtio-mmio InterruptStatus bits), virtio 1.2 section 4.2.2.
VIRTIO_MMIO_INT_VRING = 1
VIRTIO_MMIO_INT_CONFIG = 2

# Device ids, virtio 1.2 section 5.
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_MEM = 24
VIRTIO_ID_PMEM = 27


def feature_bit(bit: int) -> int:
    """The feature mask of bit number `bit`."""
    return 1 << bit


def has_feature(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


class VirtioDeviceError(GuestFault):
    """A device cannot go on because its driver broke a rule it cannot answer (a broken ring, DRIVER_OK
    without a queue, a refused feature).

    Each device subclasses it (BalloonError, MemError, PmemError, ConsoleError). Raised out of a device method,
    it makes the transport set DEVICE_NEEDS_RESET; it never travels further (the guest cannot crash the VMM).
    """


class VirtioDevice(abc.ABC):
    """A virtio device model. Subclasses set `device_id` and `queue_max_sizes` and call super().__init__()."""

    device_id: int = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.lock = threading.RLock()
        self._interrupt: Callable[[int], None] | None = None
        self._failure: Callable[[BaseException], None] | None = None

    @abc.abstractmethod
    def device_features(self) -> int:
        """Feature bits offered to the driver; must include 1 << VIRTIO_F_VERSION_1."""

    def accept_features(self, features: int) -> bool:
        """Whether the driver's `features` are acceptable at FEATURES_OK (the transport checked VERSION_1 and
        that nothing unoffered is set). A device that cannot work without one of its features says no here, so
        the driver sees FEATURES_OK not stick and gives up, instead of waiting forever after DRIVER_OK."""
        return True

    @abc.abstractmethod
    def read_config(self, offset: int, length: int) -> bytes:
        """`length` bytes of the device configuration space at `offset` (zeros past its end)."""

    @abc.abstractmethod
    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote `data` to the configuration space at `offset`."""

    @abc.abstractmethod
    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        """The driver set DRIVER_OK with the negotiated `features`."""

    @abc.abstractmethod
    def notify(self, queue_index: int) -> None:
        """The driver made buffers available on queue `queue_index`."""

    @abc.abstractmethod
    def reset(self) -> None:
        """The driver reset the device: forget the queues and negotiated state."""

    # --- interrupt plumbing, bound by the transport ----------------------------------------------------

    def bind_interrupt(self, interrupt: Callable[[int], None]) -> None:
        """Set the callback that raises an interrupt with reason VIRTIO_MMIO_INT_VRING or _CONFIG."""
        self._interrupt = interrupt

    def bind_failure(self, failure: Callable[[BaseException], None]) -> None:
        """Set the callback that marks the device DEVICE_NEEDS_RESET (see `report_failure`)."""
        self._failure = failure

    def signal_used(self, queue: SplitVirtqueue | None = None) -> None:
        """Tell the driver used buffers are ready; with `queue`, only if its notification suppression allows."""
        if queue is not None and not queue.should_interrupt():
            return
        interrupt = getattr(self, "_interrupt", None)
        if interrupt is not None:
            interrupt(VIRTIO_MMIO_INT_VRING)

    def signal_config_change(self) -> None:
        """Tell the driver the configuration space changed (the transport bumps ConfigGeneration)."""
        interrupt = getattr(self, "_interrupt", None)
        if interrupt is not None:
            interrupt(VIRTIO_MMIO_INT_CONFIG)

    def report_failure(self, error: BaseException) -> None:
        """Mark the device broken (DEVICE_NEEDS_RESET) from outside a transport call, e.g. a worker thread."""
        failure = getattr(self, "_failure", None)
        if failure is not None:
            failure(error)

    # --- taking requests ---------------------------------------------------------------------------------

    def drain(self, queue: SplitVirtqueue, handle: Handler, *, fault_counter: str = "errors",
              error: type[VirtioDeviceError] = VirtioDeviceError, more: Callable[[], bool] | None = None) -> int:
        """Take the available chains of `queue`, answer each, and interrupt once; return how many were answered.

        At most one queue's worth per call (the work a kick causes is bounded), and only while `more()` is true
        when given. `handle(chain)` returns the bytes it wrote into the chain's buffers, or None when the
        device keeps the chain to answer later. The policy for a hostile driver, the same for every device
        (QEMU answers the first kind too, and marks the device broken for the second):

        - a malformed chain whose head is known (a descriptor loop, a buffer outside guest RAM or in unplugged
          memory, a bad indirect table) or a buffer that fails while `handle` reads or writes it
          (VirtqueueError, GuestMemoryError): a guest fault, returned with 0 bytes written, counted in
          `fault_counter`, logged at debug level only (the guest controls how often), and draining goes on;
        - a ring too broken to answer (no head: the available index running ahead, more heads in flight than
          the queue holds, a head out of range, a used ring that cannot be written): `error` is raised, which
          the transport turns into DEVICE_NEEDS_RESET. Chains answered before it are still signalled.
        """
        answered = 0
        try:
            for _ in range(max(queue.size, 1)):
                if more is not None and not more():
                    break
                try:
                    chain = queue.pop()
                except VirtqueueError as err:
                    if err.head is None:
                        raise error(f"queue {queue.index}: {err}") from err
                    self._drain_fault(queue, fault_counter, err)
                    self._drain_push(queue, err.head, 0, error)
                    answered += 1
                    continue
                if chain is None:
                    break
                try:
                    written = handle(chain)
                except (VirtqueueError, GuestMemoryError) as err:
                    self._drain_fault(queue, fault_counter, err)
                    written = 0
                if written is None:
                    continue
                self._drain_push(queue, chain.head, written, error)
                answered += 1
        finally:
            if answered:
                self.signal_used(queue)
        return answered

    def _drain_fault(self, queue: SplitVirtqueue, counter: str, err: Exception) -> None:
        log.debug("virtio device %d queue %d: %s", self.device_id, queue.index, err)
        self.count(counter)

    @staticmethod
    def _drain_push(queue: SplitVirtqueue, head: int, written: int, error: type[VirtioDeviceError]) -> None:
        try:
            queue.push_used(head, written)
        except VirtqueueError as err:
            raise error(f"queue {queue.index}: {err}") from err

    def count(self, name: str, amount: int = 1) -> None:
        """Add `amount` to counter `name`."""
        counters = self.__dict__.setdefault("counters", {})
        counters[name] = counters.get(name, 0) + amount
