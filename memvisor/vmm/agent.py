"""The host side of the guest agent: commands into the guest and their output back, over the second UART.

Protocol (the guest side is memvisor/guest/agent.sh), one line per message, lines end with \\n:
  guest -> host  `MVAGENT READY`                  the agent started (again, after a reboot)
  host -> guest  `RUN <id> <base64 command>`      run it with /bin/sh -c
  guest -> host  `<id> O <base64>` / `<id> E <base64>`   stdout / stderr, in lines of base64
  guest -> host  `<id> X <status>`                the exit status; the command is over
  host -> guest  `PING <id>`  ->  `<id> PONG`;  `POWEROFF` powers the guest off
"""

import base64
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memvisor.errors import MemvisorError

READY_LINE = b"MVAGENT READY"
MAX_LINE = 1 << 16


@dataclass
class ExecResult:
    """What a command in the guest produced."""

    status: int
    stdout: bytes
    stderr: bytes


@dataclass
class _Pending:
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    status: int | None = None


class AgentTimeout(MemvisorError):
    """The guest agent did not answer in time."""


class GuestAgent:
    """Talks to the guest agent; `send(bytes)` writes into the guest's UART, `on_output` takes its bytes."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._lock = threading.Condition()
        self._buffer = bytearray()
        self._ready = False
        self._boots = 0
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._exec_lock = threading.Lock()
        self._aborted: str | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def on_output(self, data: bytes) -> None:
        """Bytes the guest wrote to the agent UART (called on a vCPU thread)."""
        with self._lock:
            self._buffer += data
            while (end := self._buffer.find(b"\n")) >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[: end + 1]
                self._handle_line(line)
            if len(self._buffer) > MAX_LINE:
                self._buffer.clear()  # a guest that never ends its line cannot make us hoard memory

    def _handle_line(self, line: bytes) -> None:
        if line == READY_LINE:
            self._ready = True
            self._boots += 1
            for pending in self._pending.values():  # the guest restarted: nothing old will finish
                if pending.status is None:
                    pending.status = -1
            self._lock.notify_all()
            return
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].isdigit() or len(parts[0]) > 18:
            return  # not an id of ours (int() would refuse thousands of digits with ValueError)
        found = self._pending.get(int(parts[0]))
        if found is None:
            return
        pending = found
        kind, rest = parts[1], parts[2] if len(parts) > 2 else b""
        try:
            if kind == b"O":
                pending.stdout.append(base64.b64decode(rest))
            elif kind == b"E":
                pending.stderr.append(base64.b64decode(rest))
            elif kind == b"X":
                pending.status = int(rest)
                self._lock.notify_all()
            elif kind == b"PONG":
                pending.status = 0
                self._lock.notify_all()
        except ValueError:
            return  # a garbled line from the guest is dropped, never raised

    def mark_ready(self) -> None:
        """The guest's agent is already running (a restored snapshot: it said READY before the save)."""
        with self._lock:
            self._ready = True
            self._lock.notify_all()

    def reset(self) -> None:
        """The guest is rebooting: the agent is gone until it says READY again."""
        with self._lock:
            self._ready = False
            self._buffer.clear()

    def abort(self, message: str) -> None:
        """The machine stopped: every waiter gets a MemvisorError with `message`."""
        with self._lock:
            self._aborted = message
            self._lock.notify_all()

    def _check_aborted(self) -> None:
        if self._aborted is not None:
            raise MemvisorError(self._aborted)

    def wait_ready(self, timeout: float | None = None) -> None:
        with self._lock:
            ok = self._lock.wait_for(lambda: self._ready or self._aborted is not None, timeout)
            self._check_aborted()
            if not ok:
                raise AgentTimeout(
                    f"the guest agent did not start within {timeout:.0f} s: check the console log for boot errors"
                )

    def exec(self, command: str, timeout: float | None = None) -> ExecResult:
        """Run `command` with /bin/sh -c in the guest and wait for its output and status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._exec_lock:
            self.wait_ready(timeout)
            with self._lock:
                ident = next(self._ids)
                pending = self._pending[ident] = _Pending()
            encoded = base64.b64encode(command.encode()).decode()
            self._send(f"RUN {ident} {encoded}\n".encode())
            with self._lock:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                finished = self._lock.wait_for(
                    lambda: pending.status is not None or self._aborted is not None, remaining
                )
                del self._pending[ident]
                if pending.status is None:
                    self._check_aborted()
            if not finished:
                raise AgentTimeout(
                    f"the guest command did not finish within {timeout:.0f} s: raise --timeout"
                )
            if pending.status == -1:
                raise MemvisorError("the guest restarted while the command was running")
            assert pending.status is not None
            return ExecResult(pending.status, b"".join(pending.stdout), b"".join(pending.stderr))

    def poweroff(self) -> None:
        self._send(b"POWEROFF\n")
