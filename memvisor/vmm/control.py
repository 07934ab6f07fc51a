"""The QMP control socket of a running machine."""

from pathlib import Path
from typing import Protocol

from memvisor.vmm.machine import Machine


class ControlServer(Protocol):
    def stop(self) -> None: ...


def start_control_server(machine: Machine, path: Path) -> ControlServer:
    raise NotImplementedError
