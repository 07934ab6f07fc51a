"""The legacy devices' state as data: the 16550 UARTs, the CMOS RTC and the i8042.

The ACPI power management registers hold no state. A restored UART's interrupt line level is taken as saved,
not driven again: the in-kernel IOAPIC state, restored with the VM, already remembers that level.
Each device model reads and loads its own fields under its own lock (`snapshot_fields` / `load_fields`); the
checks stay here.
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.devices.i8042 import I8042
from memvisor.devices.rtc import CMOS_SIZE, CmosRtc
from memvisor.devices.serial import Serial16550, UartFields
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
    f = uart.snapshot_fields()
    return SerialState(f.ier, f.lcr, f.mcr, f.scr, f.fcr, f.divisor, f.thri_pending, f.line, f.rx)


def restore_serial(uart: Serial16550, state: SerialState) -> None:
    uart.load_fields(UartFields(state.ier, state.lcr, state.mcr, state.scr, state.fcr, state.divisor,
                                state.thri_pending, state.line, state.rx))  # fmt: skip


def save_rtc(rtc: CmosRtc) -> RtcState:
    index, cmos = rtc.snapshot_fields()
    return RtcState(index, cmos)


def restore_rtc(rtc: CmosRtc, state: RtcState) -> None:
    rtc.load_fields(state.index, state.cmos)


def save_i8042(device: I8042) -> I8042State:
    command_byte, output, expect_command_byte = device.snapshot_fields()
    return I8042State(command_byte, -1 if output is None else output, expect_command_byte)


def restore_i8042(device: I8042, state: I8042State) -> None:
    device.load_fields(state.command_byte, None if state.output < 0 else state.output, state.expect_command_byte)
