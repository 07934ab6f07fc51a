"""The legacy devices' state as data: the 16550 UARTs, the CMOS RTC and the i8042.

The ACPI power management registers hold no state. A restored UART's interrupt line is driven again from the
restored registers (the in-kernel IOAPIC state already remembers the level; this keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.devices.i8042 import I8042
from memvisor.devices.rtc import CMOS_SIZE, CmosRtc
from memvisor.devices.serial import Serial16550
from memvisor.snapshot.codec import require, require_length

MAX_SERIAL_INPUT = 1 << 20


@dataclass(frozen=True)
class SerialState:
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


@dataclass(frozen=True)
class RtcState:
    index: int
    cmos: bytes

    def validate(self) -> None:
        require(0 <= self.index < CMOS_SIZE, "index", f"{self.index} is not a CMOS register")
        require_length(self.cmos, CMOS_SIZE, "cmos")


@dataclass(frozen=True)
class I8042State:
    command_byte: int
    output: int  # -1: nothing waiting
    expect_command_byte: bool

    def validate(self) -> None:
        require(0 <= self.command_byte <= 0xFF, "command_byte", "does not fit 8 bits")
        require(-1 <= self.output <= 0xFF, "output", "is not a byte or -1")


def save_serial(uart: Serial16550) -> SerialState:
    with uart._lock:
        return SerialState(uart.ier, uart.lcr, uart.mcr, uart.scr, uart.fcr, uart.divisor, uart._thri_pending,
                           uart._line, bytes(uart._rx))  # fmt: skip


def restore_serial(uart: Serial16550, state: SerialState) -> None:
    with uart._lock:
        uart.ier, uart.lcr, uart.mcr, uart.scr = state.ier, state.lcr, state.mcr, state.scr
        uart.fcr, uart.divisor, uart._thri_pending = state.fcr, state.divisor, state.thri_pending
        uart._rx.clear()
        uart._rx.extend(state.rx)
        uart._line = state.line


def save_rtc(rtc: CmosRtc) -> RtcState:
    with rtc._lock:
        return RtcState(rtc._index, bytes(rtc._cmos))


def restore_rtc(rtc: CmosRtc, state: RtcState) -> None:
    with rtc._lock:
        rtc._index = state.index
        rtc._cmos[:] = state.cmos


def save_i8042(device: I8042) -> I8042State:
    with device._lock:
        output = -1 if device._output is None else device._output
        return I8042State(device._command_byte, output, device._expect_command_byte)


def restore_i8042(device: I8042, state: I8042State) -> None:
    with device._lock:
        device._command_byte = state.command_byte
        device._output = None if state.output < 0 else state.output
        device._expect_command_byte = state.expect_command_byte
