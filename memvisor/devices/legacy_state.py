"""The legacy devices' state as data: the 16550 UARTs, the CMOS RTC and the i8042.

The ACPI power management registers hold no state. A restored UART's interrupt line level is taken as saved,
not driven again: the in-kernel IOAPIC state, restored with the VM, already remembers that level.
Each device model reads and loads its own fields under its own lock (`snapshot_fields` / `load_fields`); the
checks stay here, but for the UART, whose model reads and loads its state record itself (`SerialState`, in
memvisor/devices/serial.py, with its checks).
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.devices.i8042 import I8042
from memvisor.devices.rtc import CMOS_SIZE, CmosRtc
from memvisor.devices.serial import MAX_SERIAL_INPUT, Serial16550, SerialState
from memvisor.snapshot.codec import require, require_length

__all__ = [  # SerialState and its limit live with the UART model (serial.py) and are offered here too
    "MAX_SERIAL_INPUT",
    "I8042State",
    "RtcState",
    "SerialState",
    "restore_i8042",
    "restore_rtc",
    "restore_serial",
    "save_i8042",
    "save_rtc",
    "save_serial",
]


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
    return uart.snapshot_fields()


def restore_serial(uart: Serial16550, state: SerialState) -> None:
    uart.load_fields(state)


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
