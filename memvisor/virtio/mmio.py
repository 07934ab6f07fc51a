"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2), device side.

A 4 KiB window of 32-bit little-endian registers, then the device configuration space at 0x100. The VMM
forwards every MMIO exit in the window to `read(offset, length)` / `write(offset, data)`; neither ever
raises. The transport owns the status state machine (virtio 1.2 section 3.1):

    0 -> ACKNOWLEDGE -> DRIVER -> (features written) FEATURES_OK -> (queues set up) DRIVER_OK

Bits are only ever added (clearing one is ignored) and each needs its predecessor; FEATURES_OK sticks only if
the driver accepted VIRTIO_F_VERSION_1 and nothing the device did not offer, and the device's
`accept_features` agrees (virtio-mem refuses a driver without UNPLUGGED_INACCESSIBLE there); DRIVER_OK activates the device;
writing 0 resets device and queues; FAILED is recorded. Register accesses of the wrong width (registers are
32-bit; the config space takes 1, 2, 4 or 8 bytes), unknown offsets, notifications of a nonexistent queue or
before DRIVER_OK are ignored (reads give zeros). QueueNum and the ring addresses are taken while the queue is
not ready and checked when QueueReady is written (a bad layout leaves QueueReady 0).

Any exception out of the device (`activate`, `notify`, `read_config`, `write_config`, `reset`) or a
`report_failure` from a device worker sets DEVICE_NEEDS_RESET and raises a configuration interrupt; the
transport stays usable and a reset clears it. The first error is logged with its traceback, later ones are
counted (`errors`) and kept in `last_error`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from memvisor.lazylog import lazy_logger
from memvisor.memory.guest_memory import GuestMemory
from memvisor.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    TRANSPORT_FEATURES,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
)
from memvisor.virtio.queue import SplitVirtqueue, VirtqueueError

log = lazy_logger(__name__)  # imports logging at its first message

MMIO_WINDOW_SIZE = 0x1000

# Register offsets, virtio 1.2 section 4.2.2 (table "MMIO Device Register Layout").
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR = 0x554D4551  # "QEMU", what Linux and QEMU's virtio-mmio devices report

_REG = struct.Struct("<I")
# Device-specific feature bits: 0-23 and 50-127 (virtio 1.2 section 2.2); 24-49 are the transport's, and of
# those only the ones it implements (TRANSPORT_FEATURES) are offered.
_DEVICE_FEATURE_BITS = ((1 << 24) - 1) | (((1 << 128) - 1) & ~((1 << 50) - 1))
_CONFIG_WIDTHS = (1, 2, 4, 8)
_KNOWN_STATUS = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED)
# Each status bit the driver sets needs these already set (virtio 1.2 section 3.1.1).
_STATUS_NEEDS = {
    STATUS_ACKNOWLEDGE: 0,
    STATUS_DRIVER: STATUS_ACKNOWLEDGE,
    STATUS_FEATURES_OK: STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    STATUS_DRIVER_OK: STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    STATUS_FAILED: 0,
}


class VirtioMmioTransport:
    """One virtio-mmio window in front of one device."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, raise_irq: Callable[[], None]):
        self.device = device
        self.memory = memory
        self.raise_irq = raise_irq
        self.queues = [SplitVirtqueue(i, size, memory) for i, size in enumerate(device.queue_max_sizes)]
        self._lock = threading.RLock()  # registers and the state machine
        self._irq_lock = threading.Lock()  # interrupt status, generation, needs-reset: taken last, holds nothing
        self.interrupt_status = 0
        self.config_generation = 0
        self._needs_reset = False
        self.errors = 0
        self.last_error: str | None = None
        self._reset_registers()
        device.bind_interrupt(self._interrupt)
        device.bind_failure(self._device_failed)

    def _reset_registers(self) -> None:
        self._status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self._offered: int | None = None
        for queue in self.queues:
            queue.reset()
        with self._irq_lock:
            self.interrupt_status = 0
            self._needs_reset = False

    # --- state seen by others ---------------------------------------------------------------------

    @property
    def status(self) -> int:
        """The device status register (with DEVICE_NEEDS_RESET when the device failed)."""
        return self._status | (STATUS_DEVICE_NEEDS_RESET if self._needs_reset else 0)

    @property
    def lock(self) -> threading.RLock:
        """Held while the registers and the status state machine change (a snapshot reads and loads under it)."""
        return self._lock

    @property
    def driver_status(self) -> int:
        """The status bits the driver set (`status` without DEVICE_NEEDS_RESET)."""
        return self._status

    @property
    def needs_reset(self) -> bool:
        """The device failed: DEVICE_NEEDS_RESET is set until the driver resets it."""
        return self._needs_reset

    def load_status(self, driver_status: int, needs_reset: bool) -> None:
        """Set the status register as a snapshot saved it, without the state machine's checks or effects (a
        restore, with `lock` held; the caller validated the values and activates the device itself)."""
        self._status = driver_status
        self._needs_reset = needs_reset

    @property
    def active(self) -> bool:
        """DRIVER_OK is set and the device has not failed."""
        return bool(self._status & STATUS_DRIVER_OK) and not self._needs_reset

    @property
    def negotiated_features(self) -> int:
        return self.driver_features if self._status & STATUS_FEATURES_OK else 0

    def offered_features(self) -> int:
        """The device's features as offered (with the transport's own), asked of the device once per reset."""
        if self._offered is None:
            try:
                features = self.device.device_features()
            except Exception as err:
                self._device_failed(err)
                features = 1 << VIRTIO_F_VERSION_1
            # Device-specific bits are 0-23 and 50-127 (virtio 1.2 section 2.2); the reserved ones in between
            # are the transport's: VERSION_1 and the ring features it implements, never ACCESS_PLATFORM or PACKED.
            self._offered = (features & _DEVICE_FEATURE_BITS) | TRANSPORT_FEATURES
        return self._offered

    # --- interrupts and failures ------------------------------------------------------------------

    def _interrupt(self, reason: int) -> None:
        """The device's interrupt callback: set the status bit and raise the IRQ (once DRIVER_OK is set)."""
        with self._irq_lock:
            if reason & VIRTIO_MMIO_INT_CONFIG:
                self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if not self._status & STATUS_DRIVER_OK:
                return
            self.interrupt_status |= reason & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
        try:
            self.raise_irq()
        except Exception:  # the VMM's injection failing must not unwind into a device
            log.exception("virtio-mmio: raising the interrupt failed")

    def _device_failed(self, error: BaseException) -> None:
        """Mark the device DEVICE_NEEDS_RESET and tell the driver with a configuration interrupt."""
        self.errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if self.errors == 1:
            log.error("virtio device %d failed, marked DEVICE_NEEDS_RESET", self.device.device_id,
                      exc_info=(type(error), error, error.__traceback__))
        else:
            log.debug("virtio device %d failed again: %s", self.device.device_id, self.last_error)
        with self._irq_lock:
            self._needs_reset = True
            if not self._status & STATUS_DRIVER_OK:
                return
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
        try:
            self.raise_irq()
        except Exception:
            log.exception("virtio-mmio: raising the interrupt failed")

    # --- MMIO -------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Serve a guest read of `length` bytes at `offset` in the window. Never raises."""
        try:
            with self._lock:
                return self._read(offset, length)
        except Exception as err:  # a bug here must not kill the vCPU thread
            self._device_failed(err)
            return bytes(max(0, min(length, 8)))

    def write(self, offset: int, data: bytes) -> None:
        """Serve a guest write of `data` at `offset` in the window. Never raises."""
        try:
            with self._lock:
                self._write(offset, bytes(data))
        except Exception as err:
            self._device_failed(err)

    def _read(self, offset: int, length: int) -> bytes:
        if not 0 <= offset < MMIO_WINDOW_SIZE or not 0 < length <= 8:
            return bytes(max(0, min(length, 8)))
        if offset >= CONFIG:
            return self._read_config(offset - CONFIG, length)
        if length != 4 or offset % 4:
            return bytes(length)
        return _REG.pack(self._read_register(offset) & 0xFFFF_FFFF)

    def _read_config(self, offset: int, length: int) -> bytes:
        if length not in _CONFIG_WIDTHS or offset + length > MMIO_WINDOW_SIZE - CONFIG:
            return bytes(length)
        try:
            data = bytes(self.device.read_config(offset, length))
        except Exception as err:
            self._device_failed(err)
            return bytes(length)
        return data[:length].ljust(length, b"\0")

    def _selected_queue(self) -> SplitVirtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return VENDOR
        if offset == DEVICE_FEATURES:
            return self.offered_features() >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length -1 (virtio 1.2 section 4.2.2.1)
        if queue is not None and offset in _QUEUE_ADDRESS_REGISTERS:
            attr, high = _QUEUE_ADDRESS_REGISTERS[offset]
            return int(getattr(queue, attr)) >> (32 if high else 0)
        return 0

    def _write(self, offset: int, data: bytes) -> None:
        if not 0 <= offset < MMIO_WINDOW_SIZE:
            return
        if offset >= CONFIG:
            if len(data) in _CONFIG_WIDTHS and offset - CONFIG + len(data) <= MMIO_WINDOW_SIZE - CONFIG:
                try:
                    self.device.write_config(offset - CONFIG, data)
                except Exception as err:
                    self._device_failed(err)
            return
        if len(data) != 4 or offset % 4:
            return
        self._write_register(offset, _REG.unpack(data)[0])

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        setting_up = bool(self._status & STATUS_DRIVER) and not self._status & (STATUS_DRIVER_OK | STATUS_FAILED)
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if setting_up and not self._status & STATUS_FEATURES_OK and self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            if queue is not None and not queue.ready and setting_up:
                queue.size = value
        elif offset == QUEUE_READY:
            self._write_queue_ready(queue, value, setting_up)
        elif offset == QUEUE_NOTIFY:
            self._notify(value)  # without VIRTIO_F_NOTIFICATION_DATA the value is the index
        elif offset == INTERRUPT_ACK:
            with self._irq_lock:
                self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset in _QUEUE_ADDRESS_REGISTERS and queue is not None and not queue.ready and setting_up:
            attr, high = _QUEUE_ADDRESS_REGISTERS[offset]
            old = int(getattr(queue, attr))
            new = (old & 0xFFFF_FFFF) | (value << 32) if high else (old & ~0xFFFF_FFFF) | value
            setattr(queue, attr, new)

    def _write_queue_ready(self, queue: SplitVirtqueue | None, value: int, setting_up: bool) -> None:
        if queue is None:
            return
        if value == 0:
            queue.ready = False
            return
        if queue.ready or not setting_up or not self._status & STATUS_FEATURES_OK:
            return
        queue.event_idx = bool(self.driver_features >> VIRTIO_F_RING_EVENT_IDX & 1)
        queue.indirect_desc = bool(self.driver_features >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        try:
            queue.enable()
        except VirtqueueError as err:
            log.debug("virtio-mmio: refusing QueueReady: %s", err)

    def _notify(self, index: int) -> None:
        if not self.active or index >= len(self.queues) or not self.queues[index].ready:
            return
        try:
            self.device.notify(index)
        except Exception as err:
            self._device_failed(err)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self._status
        new_bits = value & _KNOWN_STATUS & ~old
        if old & ~value & _KNOWN_STATUS:
            return  # clearing a bit other than by reset is not allowed
        for bit in (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK, STATUS_FAILED):
            if not new_bits & bit:
                continue
            if (self._status & _STATUS_NEEDS[bit]) != _STATUS_NEEDS[bit]:
                return  # out of order: ignore this and the later bits
            if bit == STATUS_FEATURES_OK and not self._features_acceptable():
                continue  # FEATURES_OK does not stick; the driver reads it back and gives up
            self._status |= bit
            if bit == STATUS_DRIVER_OK:
                self._activate()

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        if not features >> VIRTIO_F_VERSION_1 & 1 or features & ~self.offered_features():
            return False
        try:
            return bool(self.device.accept_features(features))
        except Exception as err:
            self._device_failed(err)
            return False

    def _activate(self) -> None:
        features = self.driver_features
        for queue in self.queues:
            queue.event_idx = bool(features >> VIRTIO_F_RING_EVENT_IDX & 1)
            queue.indirect_desc = bool(features >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        try:
            self.device.activate(self.memory, self.queues, features)
        except Exception as err:
            self._device_failed(err)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status): device, queues and registers back to initial state."""
        with self._lock:
            try:
                self.device.reset()
            except Exception as err:
                log.error("virtio device %d: reset failed: %s", self.device.device_id, err)
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"
            self._reset_registers()


# Queue address registers: offset -> (SplitVirtqueue attribute, high half).
_QUEUE_ADDRESS_REGISTERS = {
    QUEUE_DESC_LOW: ("desc_addr", False),
    QUEUE_DESC_HIGH: ("desc_addr", True),
    QUEUE_DRIVER_LOW: ("driver_addr", False),
    QUEUE_DRIVER_HIGH: ("driver_addr", True),
    QUEUE_DEVICE_LOW: ("device_addr", False),
    QUEUE_DEVICE_HIGH: ("device_addr", True),
}
