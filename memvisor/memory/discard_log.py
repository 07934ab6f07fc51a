"""A log of every host discard of guest memory, for matching a guest's lost page against what memvisor gave back.

    MEMVISOR_DISCARD_LOG=/tmp/discards.log memvisor run ...

With MEMVISOR_DISCARD_LOG set (read once, when this module is first imported), every operation by which
memvisor takes memory from under the guest appends one line to that file:

    <monotonic ns> <who> <op> gpa=<first>-<end> len=<bytes> region=<name> offset=<offset> [failed: <reason>]

- monotonic ns: `time.monotonic_ns()` taken just before the host call (CLOCK_MONOTONIC, comparable with the
  exit trail's times in the same process);
- who: the path that asked (`balloon-inflate`, `balloon-report`, `mem-unplug`, `mem-unplug-all`,
  `mem-unplug-all-region`, `mem-plug-rollback`, `migration-zero`; `discard` for a caller that named none);
- op: `punch` (fallocate PUNCH_HOLE on a memfd or file), `dontneed` (MADV_DONTNEED on private memory),
  `prot-none` / `prot-rw` (a virtio-mem range made inaccessible / accessible again), and `give-back` (who:
  `balloon-deflate`: not a discard, the moment the guest took ballooned pages back, so a page's story reads
  discarded -> given back -> used);
- gpa: the guest physical range [first, end) in hex, computed from the region's own base (not from the
  caller's arithmetic), so a wrong offset anywhere above shows up as a wrong range here;
- region and offset: the host region (its name) and the offset in its memfd or mapping.

One `os.write` per line on an O_APPEND descriptor, so lines of concurrent vCPU threads never interleave.
When the variable is unset `active` is None and the cost on each discard is one module attribute load.
A write failure (disk full) is reported once on stderr and turns the log off; it never fails a discard.
"""

from __future__ import annotations

import os
import sys
import threading
import time

ENV = "MEMVISOR_DISCARD_LOG"


class DiscardLog:
    """An append-only text file of discards (one line each)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock = threading.Lock()  # only for close/turning off; the writes themselves are atomic appends

    def record(self, start_ns: int, who: str, op: str, gpa: int, length: int, region: str, offset: int,
               error: str = "") -> None:  # fmt: skip
        """Append one line (see the module docstring)."""
        line = (f"{start_ns} {who} {op} gpa={gpa:#x}-{gpa + length:#x} len={length:#x} region={region} "
                f"offset={offset:#x}" + (f" failed: {error}" if error else "") + "\n")  # fmt: skip
        fd = self._fd
        if fd < 0:
            return
        try:
            os.write(fd, line.encode())
        except OSError as err:
            sys.stderr.write(f"memvisor: {ENV}: cannot write to {self.path!r} ({err.strerror}); discard log off\n")
            self.close()
            uninstall()

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


# The log in force (None: off). Read by MemoryRegion.discard/protect at every call: keep it a plain attribute.
active: DiscardLog | None = None


def install(path: str) -> DiscardLog:
    """Start logging to `path` (appending); replaces a log already in force."""
    global active
    previous = active
    active = DiscardLog(path)
    if previous is not None:
        previous.close()
    return active


def uninstall() -> None:
    """Stop logging (the file stays)."""
    global active
    previous, active = active, None
    if previous is not None:
        previous.close()


def now_ns() -> int:
    return time.monotonic_ns()


def _from_environment() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        install(path)
    except OSError as err:  # a user's setting: say what is wrong and run without the log
        sys.stderr.write(f"memvisor: {ENV}={path!r}: cannot open it ({err.strerror}); running without a discard "
                         "log: give a writable file path\n")


_from_environment()
