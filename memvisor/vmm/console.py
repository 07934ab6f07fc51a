"""The guest console: bytes from COM1 to a file or standard output, watched for a kernel panic."""

import collections
import contextlib
import os
import re
import threading
from collections.abc import Callable

PANIC_RE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")
TAIL_LINES = 50  # complete lines kept for a report (`tail`)
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class Console:
    """Writes console bytes to `fd` and calls `on_panic(message)` once when the kernel panics."""

    def __init__(self, fd: int, on_panic: Callable[[str], None]) -> None:
        self._fd = fd
        self._on_panic = on_panic
        self._line = bytearray()
        self._tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self.panicked = False

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a closed console must not stop the guest
            os.write(self._fd, data)
        with self._lock:
            self._line += data
            while (end := self._line.find(b"\n")) >= 0:
                line = bytes(self._line[:end])
                del self._line[: end + 1]
                self._check(line)
                self._tail.append(line)
            if len(self._line) > 4096:
                del self._line[:-1024]

    def _check(self, line: bytes) -> None:
        match = PANIC_RE.search(line)
        if match and not self.panicked:
            self.panicked = True
            self._on_panic(match.group(1).decode(errors="replace").strip())

    def tail(self, count: int) -> tuple[str, ...]:
        """The last `count` lines the guest wrote (at most TAIL_LINES), with the unfinished one, as text safe to
        print: the guest's control characters (terminal escapes) become `?`."""
        with self._lock:
            lines = [*self._tail, bytes(self._line)] if self._line else list(self._tail)
        return tuple(_UNPRINTABLE.sub("?", line.decode(errors="replace").rstrip("\r")) for line in lines[-count:])
