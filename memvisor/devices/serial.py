"""A 16550A UART: enough of it for Linux's 8250 driver to use as a console or a byte channel.

Registers (National Semiconductor PC16550D data sheet; offsets from the base port, DLAB = LCR bit 7):
  0 RBR (read) / THR (write) / DLL (DLAB)   1 IER / DLM (DLAB)   2 IIR (read) / FCR (write)
  3 LCR   4 MCR   5 LSR   6 MSR   7 SCR
Transmission is instant (THR is always empty again at once); received bytes wait in an unbounded buffer.
The interrupt line follows the pending state (KVM_IRQ_LINE level), so edges reach the IOAPIC when an
interrupt becomes pending, as QEMU's serial does.
"""

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from memvisor.snapshot.codec import require

RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IIR_NO_INTERRUPT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40
MCR_LOOP = 0x10
MSR_DCD_DSR_CTS = 0xB0  # carrier detect, data set ready, clear to send


MAX_SERIAL_INPUT = 1 << 20  # input a snapshot may hold for the guest to read


@dataclass(frozen=True)
class SerialState:
    """A UART's registers, its THR-empty interrupt source, its interrupt line and the input the guest has not
    read: everything a snapshot keeps, as one record the model reads and loads (`snapshot_fields` /
    `load_fields`) and the snapshot codec encodes and checks (`validate`; memvisor/devices/legacy_state.py)."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    divisor: int
    thri_pending: bool
    line: int
    rx: bytes

    def validate(self) -> None:
        for name in ("ier", "lcr", "mcr", "scr", "fcr"):
            require(0 <= getattr(self, name) <= 0xFF, name, "does not fit 8 bits")
        require(0 <= self.divisor <= 0xFFFF, "divisor", "does not fit 16 bits")
        require(self.line in (0, 1), "line", f"{self.line} is not 0 or 1")
        require(len(self.rx) <= MAX_SERIAL_INPUT, "rx", "holds more input than a UART may buffer")


class Serial16550:
    """One UART. `output(bytes)` receives what the guest transmits; `irq(level)` drives its line."""

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[int], None]) -> None:
        self._output = output
        self._irq = irq
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.fcr = 0
        self.divisor = 12
        self._thri_pending = False
        self._line = 0

    # Host side.
    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read (from the host's input or a channel)."""
        with self._lock:
            self._rx.extend(data)
            self._update_irq()

    def pending_input(self) -> int:
        with self._lock:
            return len(self._rx)

    # Snapshot.
    def snapshot_fields(self) -> SerialState:
        """Every field a snapshot keeps, read at once."""
        with self._lock:
            return SerialState(self.ier, self.lcr, self.mcr, self.scr, self.fcr, self.divisor, self._thri_pending,
                               self._line, bytes(self._rx))  # fmt: skip

    def load_fields(self, state: SerialState) -> None:
        """A snapshot's fields (the caller validated them); the interrupt line is taken as saved, not driven."""
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = state.ier, state.lcr, state.mcr, state.scr
            self.fcr, self.divisor, self._thri_pending = state.fcr, state.divisor, state.thri_pending
            self._rx.clear()
            self._rx.extend(state.rx)
            self._line = state.line

    # Guest side (port I/O exits).
    def read(self, offset: int) -> int:
        with self._lock:
            return self._read(offset)

    def write(self, offset: int, value: int) -> None:
        out = None
        with self._lock:
            out = self._write(offset, value)
        if out is not None:
            self._output(out)

    def _read(self, offset: int) -> int:
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                return self.divisor & 0xFF
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER:
            return (self.divisor >> 8) if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            fifo = IIR_FIFO_ENABLED if self.fcr & 1 else 0
            if self.ier & IER_RDI and self._rx:
                return IIR_RDI | fifo
            if self.ier & IER_THRI and self._thri_pending:
                self._thri_pending = False  # reading IIR with THRI the source clears it
                self._update_irq()
                return IIR_THRI | fifo
            return IIR_NO_INTERRUPT | fifo
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY | (LSR_DATA_READY if self._rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (the driver's probe checks this).
                m = self.mcr
                return ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return MSR_DCD_DSR_CTS
        return self.scr

    def _write(self, offset: int, value: int) -> bytes | None:
        value &= 0xFF
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
                return None
            self._thri_pending = True
            self._update_irq()
            if self.mcr & MCR_LOOP:
                self._rx.append(value)
                self._update_irq()
                return None
            return bytes([value])
        if offset == IER:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return None
            enabling_thri = value & IER_THRI and not self.ier & IER_THRI
            self.ier = value & 0x0F
            if enabling_thri:
                self._thri_pending = True
            self._update_irq()
        elif offset == IIR_FCR:
            self.fcr = value
            if value & 0x02:
                self._rx.clear()
                self._update_irq()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        return None

    def _update_irq(self) -> None:
        level = int(bool((self.ier & IER_RDI and self._rx) or (self.ier & IER_THRI and self._thri_pending)))
        if level != self._line:
            self._line = level
            self._irq(level)
