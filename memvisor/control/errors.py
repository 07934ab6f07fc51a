"""QmpError: a command's failure as QMP reports it, `{"error": {"class": ..., "desc": ...}}`.

The classes are QEMU's (QAPI `QapiErrorClass`): GenericError for almost everything, CommandNotFound,
DeviceNotActive (no balloon), DeviceNotFound (no such QOM path or device id).
"""

from __future__ import annotations

from typing import Any

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"


class QmpError(Exception):
    """A command failed; `desc` is the one-line text QEMU would give, `error_class` its QAPI error class."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_json(self) -> dict[str, Any]:
        """The value of the reply's `error` member."""
        return {"class": self.error_class, "desc": self.desc}
