"""A minimal MC146818 CMOS real-time clock at ports 0x70/0x71.

Linux reads the wall clock once at boot and the rtc_cmos driver probes a few registers. Without an RTC
every read returns 0xff, which reads as "update in progress" forever, and the guest spins through tens of
thousands of exits (docs/LAB.md). This one reports the host's UTC time in BCD, never an update in progress, and
ignores writes except the index and the few control registers.
"""

import threading
import time
from collections.abc import Callable

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_DAY_OF_WEEK = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
REG_B_24H = 0x02
REG_D_VALID_RAM = 0x80
CMOS_SIZE = 128


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class CmosRtc:
    """The index port (0x70) selects a CMOS byte that the data port (0x71) reads or writes."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate, UIP clear
        self._cmos[REG_B] = REG_B_24H
        self._cmos[REG_D] = REG_D_VALID_RAM

    def snapshot_fields(self) -> tuple[int, bytes]:
        """The selected register index and the CMOS bytes, read at once (for a snapshot)."""
        with self._lock:
            return self._index, bytes(self._cmos)

    def load_fields(self, index: int, cmos: bytes) -> None:
        """A snapshot's index and CMOS bytes (the caller checked the index and the length)."""
        with self._lock:
            self._index = index
            self._cmos[:] = cmos

    def read(self, offset: int) -> int:
        with self._lock:
            if offset == 0:
                return self._index
            return self._read_register(self._index)

    def write(self, offset: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                self._index = value & 0x7F  # bit 7 is the NMI mask
            elif self._index in (REG_A, REG_B) or self._index >= 0x0E:
                self._cmos[self._index] = value & 0xFF
                if self._index == REG_A:
                    self._cmos[REG_A] &= 0x7F  # never an update in progress

    def _read_register(self, index: int) -> int:
        if index > REG_YEAR and index != REG_CENTURY:
            if index == REG_C:
                return 0  # no interrupt flags
            return self._cmos[index]
        now = time.gmtime(self._clock())
        values = {
            REG_SECONDS: now.tm_sec,
            REG_MINUTES: now.tm_min,
            REG_HOURS: now.tm_hour,
            REG_DAY_OF_WEEK: (now.tm_wday + 1) % 7 + 1,
            REG_DAY: now.tm_mday,
            REG_MONTH: now.tm_mon,
            REG_YEAR: now.tm_year % 100,
            REG_CENTURY: now.tm_year // 100,
        }
        if index not in values:
            return self._cmos[index]  # alarm registers
        value = values[index]
        return value if self._cmos[REG_B] & 0x04 else _bcd(value)  # REG_B bit 2: binary mode
