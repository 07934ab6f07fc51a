"""The legacy PC devices as a guest driver sees them: 16550A UART, CMOS RTC, i8042 and ACPI sleep/reset.

Register numbers and bits are written out from the data sheets (PC16550D, MC146818) and ACPI 6.4 4.8.3,
so these tests read like the Linux drivers that poke them (8250_port.c, rtc-mc146818-lib.c, i8042.c).
"""

import calendar
import random

import pytest

from memvisor.boot import layout
from memvisor.devices.acpi_pm import AcpiPowerManagement
from memvisor.devices.i8042 import I8042
from memvisor.devices.rtc import CmosRtc
from memvisor.devices.serial import Serial16550

# 16550 register offsets and bits.
THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7
LCR_DLAB = 0x80
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Uart:
    """A Serial16550 with its output and interrupt line recorded."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.levels: list[int] = []
        self.device = Serial16550(self.sent.extend, self.levels.append)

    @property
    def line(self) -> int:
        return self.levels[-1] if self.levels else 0

    def read(self, offset: int) -> int:
        return self.device.read(offset)

    def write(self, offset: int, value: int) -> None:
        self.device.write(offset, value)


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_scratch_register(uart: Uart) -> None:
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        uart.write(SCR, value)
        assert uart.read(SCR) == value


def test_divisor_latch(uart: Uart) -> None:
    uart.write(IER, 0x05)
    uart.write(LCR, LCR_DLAB | 0x03)
    uart.write(DLL, 0x01)  # 115200 baud
    uart.write(DLM, 0x02)
    assert uart.read(DLL) == 0x01 and uart.read(DLM) == 0x02
    uart.write(LCR, 0x03)
    assert uart.read(IER) == 0x05, "IER unchanged by divisor writes"
    assert uart.sent == b"", "divisor writes are not data"
    uart.write(LCR, LCR_DLAB | 0x03)
    assert uart.read(DLL) == 0x01 and uart.read(DLM) == 0x02
    assert uart.read(LCR) == LCR_DLAB | 0x03


def test_line_status_transmitter_always_ready(uart: Uart) -> None:
    assert uart.read(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert not uart.read(LSR) & LSR_DR
    uart.write(THR, ord("x"))
    assert uart.read(LSR) & LSR_THRE


def test_output_callback_gets_transmitted_bytes(uart: Uart) -> None:
    for byte in b"hello\r\n\x00\xff":
        uart.write(THR, byte)
    assert bytes(uart.sent) == b"hello\r\n\x00\xff"
    uart.write(THR, 0x141)  # only the low byte reaches the wire
    assert uart.sent[-1] == 0x41


def test_loopback_modem_status(uart: Uart) -> None:
    """8250 autoconfig: MCR = LOOP|OUT2|RTS must read back as MSR DCD|CTS."""
    uart.write(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert uart.read(MSR) & 0xF0 == MSR_DCD | MSR_CTS
    uart.write(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert uart.read(MSR) & 0xF0 == MSR_DSR | MSR_RI
    uart.write(MCR, MCR_LOOP)
    assert uart.read(MSR) & 0xF0 == 0


def test_loopback_data_comes_back_instead_of_going_out(uart: Uart) -> None:
    uart.write(MCR, MCR_LOOP)
    uart.write(THR, 0x55)
    assert uart.sent == b""
    assert uart.read(LSR) & LSR_DR
    assert uart.read(RBR) == 0x55
    uart.write(MCR, MCR_OUT2)
    assert uart.read(MSR) & (MSR_DCD | MSR_DSR | MSR_CTS) == MSR_DCD | MSR_DSR | MSR_CTS  # a cable is present


def test_thri_after_enabling_ier(uart: Uart) -> None:
    assert uart.read(IIR) & 0x0F == IIR_NO_INT
    uart.write(IER, IER_THRI)
    assert uart.line == 1, "enabling THRI with an empty THR raises the interrupt"
    assert uart.read(IIR) & 0x0F == IIR_THRI
    assert uart.line == 0, "reading IIR with THRI as the source clears it"
    assert uart.read(IIR) & 0x0F == IIR_NO_INT
    uart.write(THR, ord("a"))
    assert uart.line == 1, "the next character empties THR again at once"
    assert uart.read(IIR) & 0x0F == IIR_THRI
    uart.write(IER, 0)
    assert uart.line == 0


def test_rx_feed_raises_and_reading_drains(uart: Uart) -> None:
    uart.device.feed(b"ab")
    assert uart.line == 0, "no interrupt while IER.RDI is off"
    assert uart.read(LSR) & LSR_DR
    uart.write(IER, IER_RDI)
    assert uart.line == 1
    assert uart.read(IIR) & 0x0F == IIR_RDI
    assert uart.device.pending_input() == 2
    assert uart.read(RBR) == ord("a")
    assert uart.line == 1
    assert uart.read(RBR) == ord("b")
    assert uart.line == 0
    assert not uart.read(LSR) & LSR_DR
    assert uart.read(RBR) == 0, "reading an empty receiver gives 0"
    uart.device.feed(b"c")
    assert uart.line == 1


def test_rdi_takes_priority_over_thri(uart: Uart) -> None:
    uart.write(IER, IER_RDI | IER_THRI)
    uart.device.feed(b"z")
    assert uart.read(IIR) & 0x0F == IIR_RDI
    uart.read(RBR)
    assert uart.read(IIR) & 0x0F == IIR_THRI


def test_fifo_control_clears_the_receiver(uart: Uart) -> None:
    uart.write(IER, IER_RDI)
    uart.device.feed(b"junk")
    uart.write(FCR, 0x01 | 0x02)  # enable FIFOs, clear RX
    assert uart.device.pending_input() == 0
    assert uart.line == 0
    assert uart.read(IIR) & 0xC0 == 0xC0, "FIFOs enabled shows in IIR bits 7-6 (a 16550A)"


def test_random_register_traffic_never_raises(uart: Uart) -> None:
    generator = random.Random(1)
    for _ in range(5000):
        offset = generator.randrange(8)
        if generator.random() < 0.5:
            assert 0 <= uart.read(offset) <= 0xFF
        else:
            uart.write(offset, generator.randrange(1 << 16))
    assert set(uart.levels) <= {0, 1}
    assert all(a != b for a, b in zip(uart.levels, uart.levels[1:], strict=False)), "the line only changes"


# --- CMOS RTC ----------------------------------------------------------------------------------------------

LEAP_EVE = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0))  # a Thursday


def _cmos(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, index)
    return rtc.read(1)


def test_rtc_bcd_time_matches_the_clock() -> None:
    rtc = CmosRtc(clock=lambda: LEAP_EVE)
    assert _cmos(rtc, 0x00) == 0x58
    assert _cmos(rtc, 0x02) == 0x59
    assert _cmos(rtc, 0x04) == 0x23
    assert _cmos(rtc, 0x06) == 5  # day of week, Sunday = 1
    assert _cmos(rtc, 0x07) == 0x29
    assert _cmos(rtc, 0x08) == 0x02
    assert _cmos(rtc, 0x09) == 0x24
    assert _cmos(rtc, 0x32) == 0x20  # century


def test_rtc_follows_the_clock() -> None:
    now = [LEAP_EVE]
    rtc = CmosRtc(clock=lambda: now[0])
    now[0] += 2
    assert [_cmos(rtc, i) for i in (0x00, 0x02, 0x04, 0x07, 0x08)] == [0x00, 0x00, 0x00, 0x01, 0x03]
    now[0] = calendar.timegm((2023, 12, 31, 9, 5, 7, 0, 0, 0))  # a Sunday
    assert _cmos(rtc, 0x06) == 1
    assert _cmos(rtc, 0x09) == 0x23


def test_rtc_binary_mode() -> None:
    rtc = CmosRtc(clock=lambda: LEAP_EVE)
    rtc.write(0, 0x0B)
    rtc.write(1, rtc.read(1) | 0x04)  # DM: binary
    assert _cmos(rtc, 0x00) == 58 and _cmos(rtc, 0x07) == 29 and _cmos(rtc, 0x09) == 24


def test_rtc_status_registers() -> None:
    rtc = CmosRtc(clock=lambda: LEAP_EVE)
    for _ in range(1000):
        assert not _cmos(rtc, 0x0A) & 0x80, "update in progress is never set"
    rtc.write(0, 0x0A)
    rtc.write(1, 0xA6)  # even a guest that writes UIP does not get it back
    assert not _cmos(rtc, 0x0A) & 0x80
    assert _cmos(rtc, 0x0B) & 0x02, "24-hour mode"
    assert _cmos(rtc, 0x0D) & 0x80, "valid RAM and time"
    assert _cmos(rtc, 0x0C) == 0


def test_rtc_index_port_masks_nmi_bit_and_ram_is_kept() -> None:
    rtc = CmosRtc(clock=lambda: LEAP_EVE)
    rtc.write(0, 0x80 | 0x00)  # NMI disable bit with index 0
    assert rtc.read(1) == 0x58
    rtc.write(0, 0x40)
    rtc.write(1, 0x1234)
    assert _cmos(rtc, 0x40) == 0x34
    rtc.write(0, 0x00)
    rtc.write(1, 0x11)  # writes to the clock are ignored: the host's time rules
    assert _cmos(rtc, 0x00) == 0x58


# --- i8042 -------------------------------------------------------------------------------------------------

DATA, COMMAND = 0, 4


def test_i8042_reset_line() -> None:
    resets: list[int] = []
    controller = I8042(lambda: resets.append(1))
    controller.write(COMMAND, 0xFE)
    assert resets == [1]
    controller.write(DATA, 0xFE)
    assert resets == [1], "0xFE on the data port is not the reset command"


def test_i8042_self_test() -> None:
    controller = I8042(lambda: None)
    assert not controller.read(COMMAND) & 0x01
    controller.write(COMMAND, 0xAA)
    assert controller.read(COMMAND) & 0x01, "output buffer full"
    assert controller.read(DATA) == 0x55
    assert not controller.read(COMMAND) & 0x01
    assert controller.read(DATA) == 0, "an empty buffer reads 0"


def test_i8042_command_byte() -> None:
    controller = I8042(lambda: None)
    controller.write(COMMAND, 0x20)
    original = controller.read(DATA)
    controller.write(COMMAND, 0x60)
    controller.write(DATA, 0x65)
    controller.write(COMMAND, 0x20)
    assert controller.read(DATA) == 0x65
    assert original != 0x65
    controller.write(DATA, 0x11)  # a data byte without 0x60 before it leaves the command byte alone
    controller.write(COMMAND, 0x20)
    assert controller.read(DATA) == 0x65


def test_i8042_status_has_system_flag() -> None:
    assert I8042(lambda: None).read(COMMAND) & 0x04


# --- ACPI sleep control and reset --------------------------------------------------------------------------

SLP_EN = 1 << 5


class Power:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.device = AcpiPowerManagement(
            lambda: self.events.append("off"), lambda: self.events.append("reset")
        )


def test_s5_with_slp_en_powers_off() -> None:
    power = Power()
    power.device.write(layout.ACPI_SLEEP_CONTROL_PORT, (5 << 2) | SLP_EN)
    assert power.events == ["off"]


@pytest.mark.parametrize(
    "value", [5 << 2, (1 << 2) | SLP_EN, (3 << 2) | SLP_EN, (4 << 2) | SLP_EN, SLP_EN, 0]
)
def test_other_sleep_writes_do_nothing(value: int) -> None:
    power = Power()
    power.device.write(layout.ACPI_SLEEP_CONTROL_PORT, value)
    power.device.write(layout.ACPI_SLEEP_STATUS_PORT, value)
    assert power.events == []


def test_reset_register() -> None:
    power = Power()
    power.device.write(layout.ACPI_RESET_PORT, 0x02)
    assert power.events == []
    power.device.write(layout.ACPI_RESET_PORT, layout.ACPI_RESET_VALUE)
    assert power.events == ["reset"]
    power.device.write(layout.ACPI_SLEEP_CONTROL_PORT + 0x10, (5 << 2) | SLP_EN)
    assert power.events == ["reset"]


def test_registers_read_zero() -> None:
    device = Power().device
    for port in (layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT, layout.ACPI_RESET_PORT):
        assert device.read(port) == 0  # sleep status: never "woken", nothing pending
