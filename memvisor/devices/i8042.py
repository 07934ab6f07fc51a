"""A minimal i8042 keyboard controller at ports 0x60/0x64: empty buffers and the reset line.

Linux reboots by writing 0xFE to the command port (pulse the CPU reset line); the driver's probe reads the
status port and the command byte. No keyboard or mouse is emulated.
"""

import threading
from collections.abc import Callable

DATA_PORT_OFFSET = 0  # port 0x60
COMMAND_PORT_OFFSET = 4  # port 0x64
CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_SELF_TEST = 0xAA
CMD_PULSE_RESET = 0xFE
STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04
SELF_TEST_OK = 0x55


class I8042:
    """`reset()` is called when the guest pulses the reset line."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self._lock = threading.Lock()
        self._command_byte = 0x45
        self._output: int | None = None
        self._expect_command_byte = False

    def snapshot_fields(self) -> tuple[int, int | None, bool]:
        """The command byte, the byte waiting in the output buffer (None: empty) and whether the next data byte
        is a command byte, read at once (for a snapshot)."""
        with self._lock:
            return self._command_byte, self._output, self._expect_command_byte

    def load_fields(self, command_byte: int, output: int | None, expect_command_byte: bool) -> None:
        """A snapshot's fields (the caller validated them)."""
        with self._lock:
            self._command_byte = command_byte
            self._output = output
            self._expect_command_byte = expect_command_byte

    def read(self, offset: int) -> int:
        with self._lock:
            if offset == COMMAND_PORT_OFFSET:
                return STATUS_SYSTEM_FLAG | (STATUS_OUTPUT_FULL if self._output is not None else 0)
            value, self._output = self._output, None
            return value if value is not None else 0

    def write(self, offset: int, value: int) -> None:
        reset = False
        with self._lock:
            if offset == COMMAND_PORT_OFFSET:
                if value == CMD_PULSE_RESET:
                    reset = True
                elif value == CMD_READ_COMMAND_BYTE:
                    self._output = self._command_byte
                elif value == CMD_WRITE_COMMAND_BYTE:
                    self._expect_command_byte = True
                elif value == CMD_SELF_TEST:
                    self._output = SELF_TEST_OK
            elif self._expect_command_byte:
                self._command_byte = value & 0xFF
                self._expect_command_byte = False
        if reset:
            self._reset()
