"""A small synchronous QMP client (plain socket + json) for the CLI verbs; works with memvisor and QEMU alike.

    with QmpConnection("/run/vm.qmp") as qmp:
        qmp.execute("balloon", {"value": 512 << 20})
        actual = qmp.execute("query-balloon")["actual"]

Connecting reads the greeting and negotiates capabilities. Events that arrive while waiting for a reply are kept
in `events`. Every failure is a MemvisorError with one line that names the fix; a command's QMP error is a
`QmpCommandError` carrying QEMU's error class and text.
"""

from __future__ import annotations

import errno
import json
import socket
from types import TracebackType
from typing import Any

from memvisor.errors import MemvisorError

DEFAULT_TIMEOUT = 30.0
MAX_REPLY = 64 << 20

_HINTS = {
    "CommandNotFound": "list the commands with `memvisor qmp SOCK query-commands`",
    "DeviceNotActive": "start the VM with --device virtio-balloon,id=balloon0",
    "DeviceNotFound": "list the devices with `memvisor info SOCK memory-devices`",
}


class QmpCommandError(MemvisorError):
    """The server answered a command with {"error": {"class", "desc"}}."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        hint = _HINTS.get(error_class)
        super().__init__(f"{command}: {desc}" + (f" ({hint})" if hint else ""))
        self.command = command
        self.error_class = error_class
        self.desc = desc


def _connect_error(path: str, err: OSError) -> MemvisorError:
    if err.errno == errno.ENOENT:
        return MemvisorError(
            f"no QMP socket at {path}: start the VM with `memvisor run --qmp {path}` or fix the path"
        )
    if err.errno == errno.ECONNREFUSED:
        return MemvisorError(
            f"nothing listens on {path} (the VM has exited?): start it again with --qmp {path}"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return MemvisorError(f"permission denied on {path}: run as the user that started the VM")
    if err.errno == errno.ENOTSOCK:
        return MemvisorError(f"{path} is not a socket: give the path passed to --qmp")
    return MemvisorError(f"cannot connect to QMP socket {path}: {err.strerror or err}; check the path")


class QmpConnection:
    """One negotiated QMP connection. Not thread-safe: one command at a time."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        self._next_id = 0
        try:
            self._sock.connect(path)
        except OSError as err:
            self._sock.close()
            raise _connect_error(path, err) from err
        try:
            self.greeting = self._read_message()
            if "QMP" not in self.greeting:
                raise MemvisorError(f"{path} does not speak QMP (no greeting): give the path passed to --qmp")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def set_timeout(self, seconds: float) -> None:
        self._sock.settimeout(seconds)

    def _read_message(self) -> dict[str, Any]:
        """Read one newline-terminated JSON message (QEMU and memvisor both end messages with a newline)."""
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as err:
                raise MemvisorError(
                    f"no reply from {self.path} in time: the VM is busy or hung; retry"
                ) from err
            except OSError as err:
                raise MemvisorError(f"lost the QMP connection to {self.path}: {err.strerror}; retry") from err
            if not chunk:
                raise MemvisorError(f"{self.path} closed the connection (the VM exited?): check the VM")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise MemvisorError(
                    f"reply from {self.path} exceeds {MAX_REPLY} bytes: the server misbehaves"
                )
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError as err:
            raise MemvisorError(
                f"{self.path} sent something that is not JSON: give the QMP socket path"
            ) from err
        if not isinstance(message, dict):
            raise MemvisorError(
                f"{self.path} sent a JSON value that is not an object: give the QMP socket path"
            )
        return message

    def request(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command, return the whole reply message ({"return": ...} or {"error": ...}) without the id."""
        self._next_id += 1
        msg_id = f"memvisor-{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as err:
            raise MemvisorError(
                f"cannot send to {self.path}: {err.strerror}; is the VM still running?"
            ) from err
        while True:
            reply = self._read_message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") == msg_id or "id" not in reply:
                reply.pop("id", None)
                return reply

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; its `return` value, or QmpCommandError."""
        reply = self.request(command, arguments)
        if "error" in reply:
            error = reply["error"]
            raise QmpCommandError(
                command, str(error.get("class", "GenericError")), str(error.get("desc", ""))
            )
        return reply.get("return")
