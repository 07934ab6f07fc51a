"""The hardware-reduced ACPI sleep control, sleep status and reset registers (ACPI 6.4 4.8.3.7, 4.8.3.6).

Linux powers off by writing SLP_TYP (from \\_S5_) << 2 | SLP_EN to the sleep control register, and
resets by writing the FADT's reset value to the reset register.
"""

from collections.abc import Callable

from memvisor.boot import layout

SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7


class AcpiPowerManagement:
    """Calls `poweroff()` on a write of S5 with SLP_EN, `reset()` on the reset value."""

    def __init__(self, poweroff: Callable[[], None], reset: Callable[[], None]) -> None:
        self._poweroff = poweroff
        self._reset = reset

    def read(self, port: int) -> int:
        return 0

    def write(self, port: int, value: int) -> None:
        if port == layout.ACPI_SLEEP_CONTROL_PORT and value & SLP_EN:
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == layout.ACPI_S5_SLEEP_TYPE:
                self._poweroff()
        elif port == layout.ACPI_RESET_PORT and value == layout.ACPI_RESET_VALUE:
            self._reset()
