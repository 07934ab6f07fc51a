"""virtio-console (device id 3): one byte stream between the host and a guest tty; see `device` for the behaviour."""

from memvisor.devices.console.device import ConsoleError, VirtioConsoleDevice

__all__ = ["ConsoleError", "VirtioConsoleDevice"]
