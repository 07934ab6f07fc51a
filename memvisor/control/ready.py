"""Wait for a VMM's QMP socket to answer: the one helper the CLI, the demo, the guest tests and the benchmarks
share, for memvisor and QEMU alike.

    qmp = wait_for_qmp(path, lambda p: QmpConnection(p), process=vmm, timeout=240, what="memvisor's QMP")

While a VMM starts, its socket goes through "no file yet" (ENOENT), "a file nobody accepts on yet"
(ECONNREFUSED) and, for a moment, "accepted and closed" (a reset or EOF before the greeting). Each of these
means "not yet" and is retried, whichever client raised it: memvisor's `QmpConnection` wraps the OSError in a
MemvisorError (`__cause__`), qemu.qmp wraps it in a `ConnectError` (`.exc`). Anything else (permission denied,
not a socket, not QMP) is a real error and ends the wait at once. The wait also ends when the VMM process exits,
and at `timeout`, with a message that says what it waited for and what it saw last.
"""

from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from memvisor.errors import MemvisorError

T = TypeVar("T")

NOT_YET_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.EAGAIN})


class _Polled(Protocol):
    returncode: int | None

    def poll(self) -> int | None: ...


class QmpNotReady(MemvisorError):
    """The QMP socket did not answer in time, or its VMM exited first."""


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and everything it wraps: __cause__, __context__ and qemu.qmp's `.exc`, without loops."""
    seen: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if any(current is known for known in seen):
            continue
        seen.append(current)
        for inner in (current.__cause__, current.__context__, getattr(current, "exc", None)):
            if isinstance(inner, BaseException):
                pending.append(inner)
    return seen


def is_not_yet(error: BaseException) -> bool:
    """True when `error` means the socket is not accepting yet (retry), False for a real error."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno in NOT_YET_ERRNOS:
            return True
        if isinstance(cause, (EOFError, ConnectionError)):  # closed before the greeting
            return True
        if isinstance(cause, MemvisorError) and "closed the connection" in str(cause):
            return True  # QmpConnection: EOF before the greeting
    return False


def describe(error: BaseException) -> str:
    """One line for the innermost OSError (or the error itself): what the last attempt saw."""
    for cause in reversed(_causes(error)):
        if isinstance(cause, OSError) and cause.errno is not None:
            return f"{errno.errorcode.get(cause.errno, cause.errno)} ({cause.strerror})"
    return f"{type(error).__name__}: {error}"


def wait_for_qmp(
    path: str,
    connect: Callable[[str], T],
    *,
    timeout: float,
    process: _Polled | subprocess.Popen[bytes] | None = None,
    what: str = "the QMP socket",
    interval: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `connect(path)` until it succeeds; retry while the socket is not there or not accepting yet."""
    deadline = clock() + timeout
    last = "no attempt yet"
    while True:
        if process is not None and process.poll() is not None:
            raise QmpNotReady(
                f"{what} at {path}: the VMM exited with status {process.returncode} before it answered "
                f"(last attempt: {last}); see its log"
            )
        try:
            return connect(path)
        except Exception as error:
            if not is_not_yet(error):
                raise
            last = describe(error)
        if clock() >= deadline:
            raise QmpNotReady(
                f"{what} at {path} did not answer within {timeout:.0f} s (last attempt: {last}); "
                "the VMM is still starting or hung: see its log"
            )
        sleep(interval)
