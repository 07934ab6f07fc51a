"""The virtio-console device model, single port (device id 3, virtio 1.2 section 5.3).

A byte stream between the host and the guest that moves whole buffers per exit instead of one byte per
port I/O exit like a 16550 UART. Without VIRTIO_CONSOLE_F_MULTIPORT there is one port and two queues
(section 5.3.2); Linux's virtio_console driver turns that port into the tty /dev/hvc0.

- receiveq0 (queue 0, host -> guest): the driver posts device-writable buffers (Linux: one page each).
  `send(data)` appends to a pending byte buffer and fills as many posted buffers as the bytes need; bytes
  sent while no buffer is posted (or before the driver is ready, or across a driver reset) wait for the
  next ones, in order.
- transmitq0 (queue 1, guest -> host): the driver posts device-readable buffers; their bytes go to the
  `output` callback and the buffer is returned at once (Linux's hvc put_chars spins until it is).
- configuration (section 5.3.4): cols, rows, max_nr_ports, emerg_wr. Only the driver's write to emerg_wr
  means something: its low byte is one more output byte (Linux writes one character per 32-bit write).
  No size or multiport feature is offered, so the driver reads nothing else.

Threads: `send` runs on any host thread, `notify` on a vCPU thread. Both hold `self.lock` while touching
the queues; `output` is called after the lock is released (the transport still serialises notifications,
so output keeps its order), so an `output` that calls back into `send` cannot deadlock.

A hostile driver: chains with the wrong kind of buffer (readable ones on receiveq, writable ones on
transmitq) are returned with 0 bytes used and counted in `bad_chains`; a transmit chain is read up to
`MAX_CHAIN_BYTES` (the rest is dropped and counted); one notification takes at most one queue's worth of
chains. A ring too broken to answer (VirtqueueError without a head) marks the device broken: from `notify`
by raising ConsoleError (the transport sets DEVICE_NEEDS_RESET), from `send` through `report_failure`.
A broken device touches no queue until the driver resets it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from memvisor.lazylog import lazy_logger
from memvisor.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice, VirtioDeviceError, feature_bit

if TYPE_CHECKING:
    from memvisor.memory.guest_memory import GuestMemory
    from memvisor.virtio.queue import DescriptorChain, SplitVirtqueue

log = lazy_logger(__name__)  # imports logging at its first message

VIRTIO_ID_CONSOLE = 3
# struct virtio_console_config {le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr}, virtio 1.2 section 5.3.4.
CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

RECEIVEQ = 0  # receiveq0: host -> guest
TRANSMITQ = 1  # transmitq0: guest -> host
QUEUE_SIZE = 128
MAX_CHAIN_BYTES = 64 << 10  # per transmit chain; Linux sends at most one page (hvc) or 32 KiB (port write)
DEFAULT_COLS, DEFAULT_ROWS = 80, 25

COUNTER_NAMES = ("rx_bytes", "rx_buffers", "tx_bytes", "tx_buffers", "dropped_bytes", "bad_chains")

Output = Callable[[bytes], None]


class ConsoleError(VirtioDeviceError):
    """The virtio-console device cannot go on (a queue missing at DRIVER_OK, a ring it cannot answer)."""


class VirtioConsoleDevice(VirtioDevice):
    """A single-port virtio-console: `send(bytes)` to the guest, guest bytes to `output(bytes)`."""

    device_id = VIRTIO_ID_CONSOLE
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output: Output, *, cols: int = DEFAULT_COLS, rows: int = DEFAULT_ROWS):
        super().__init__()
        self.output = output
        self.cols = cols
        self.rows = rows
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._pending = bytearray()  # host bytes the guest has not received yet
        self._memory: GuestMemory | None = None
        self._queues: list[SplitVirtqueue] = []
        self._broken = False

    @property
    def pending(self) -> int:
        """Host bytes waiting for the guest to post receive buffers."""
        with self.lock:
            return len(self._pending)

    def pending_output(self) -> bytes:
        """The host bytes waiting for the guest (what `pending` counts), for a snapshot."""
        with self.lock:
            return bytes(self._pending)

    def load_pending_output(self, data: bytes) -> None:
        """Replace the waiting host bytes with a snapshot's (a restore, before the transport activates the device,
        which hands them over; the caller checked their length)."""
        with self.lock:
            self._pending = bytearray(data)

    @property
    def active(self) -> bool:
        """The driver is ready and the device not broken."""
        with self.lock:
            return bool(self._queues) and not self._broken

    # --- host side --------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue `data` for the guest and hand over what the posted receive buffers can take. Never raises."""
        if not data:
            return
        with self.lock:
            self._pending += data
            try:
                self._fill_receive_buffers()
            except Exception as err:  # a ring the guest broke: mark the device broken instead of raising
                self._broken = True
                self.report_failure(err)

    # --- VirtioDevice -----------------------------------------------------------------------------------

    def device_features(self) -> int:
        return feature_bit(VIRTIO_F_VERSION_1)

    def read_config(self, offset: int, length: int) -> bytes:
        config = CONFIG.pack(self.cols & 0xFFFF, self.rows & 0xFFFF, 1, 0)  # emerg_wr reads as 0
        if offset < 0 or length <= 0:
            return bytes(max(length, 0))
        return config[offset:offset + length].ljust(length, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """A write to emerg_wr outputs its low byte; anything else is read-only and ignored."""
        if offset == EMERG_WR_OFFSET and data:
            with self.lock:
                self.count("tx_bytes")
            self.output(bytes(data[:1]))
        else:
            log.debug("virtio-console: ignored driver write of %d bytes to config offset %d", len(data), offset)

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        if len(queues) < 2 or not queues[RECEIVEQ].ready or not queues[TRANSMITQ].ready:
            raise ConsoleError("the guest driver set DRIVER_OK without setting up both virtio-console queues")
        with self.lock:
            self._memory = memory
            self._queues = list(queues[:2])
            self._broken = False
            self._fill_receive_buffers()  # bytes the host sent before the driver was ready

    def notify(self, queue_index: int) -> None:
        """receiveq: fresh buffers for pending host bytes; transmitq: guest bytes to `output`."""
        out: list[bytes] = []
        try:
            with self.lock:
                if not self._queues or self._broken:
                    return
                try:
                    if queue_index == RECEIVEQ:
                        self._fill_receive_buffers()
                    elif queue_index == TRANSMITQ:
                        self._drain_transmit_buffers(out)
                except ConsoleError:
                    self._broken = True
                    raise
        finally:
            if out:  # what was taken before a failure still reaches the host
                self.output(b"".join(out))

    def reset(self) -> None:
        """Forget the queues; host bytes not yet delivered stay pending for the next driver."""
        with self.lock:
            self._queues = []
            self._memory = None
            self._broken = False

    # --- queues (called with self.lock held) --------------------------------------------------------------

    def _fill_receive_buffers(self) -> None:
        """Copy pending host bytes into the posted receive buffers, at most one queue's worth; signal once."""
        if not self._pending or not self._queues or self._broken:
            return
        memory = self._memory
        assert memory is not None

        def receive(chain: DescriptorChain) -> int:
            if chain.readable or not chain.writable:
                self.count("bad_chains")  # a receive buffer must be device-writable only
                return 0
            written = chain.write_all(memory, bytes(self._pending[:chain.writable_length]))
            del self._pending[:written]
            self.count("rx_bytes", written)
            self.count("rx_buffers")
            return written

        self.drain(self._queues[RECEIVEQ], receive, fault_counter="bad_chains", error=ConsoleError,
                   more=lambda: bool(self._pending))

    def _drain_transmit_buffers(self, out: list[bytes]) -> None:
        """Take the posted transmit buffers (at most one queue's worth), appending their bytes to `out`."""
        memory = self._memory
        assert memory is not None

        def transmit(chain: DescriptorChain) -> int:
            if chain.writable:
                self.count("bad_chains")  # a transmit buffer must be device-readable only
                return 0
            data = chain.read_all(memory, MAX_CHAIN_BYTES)
            self.count("dropped_bytes", chain.readable_length - len(data))
            if data:
                out.append(data)
            self.count("tx_bytes", len(data))
            self.count("tx_buffers")
            return 0

        self.drain(self._queues[TRANSMITQ], transmit, fault_counter="bad_chains", error=ConsoleError)
