"""`memvisor snapshot SOCK PATH [--resume]`: stop the VM, save it to PATH with QMP `migrate file:`, wait.

The VM is left paused (as QEMU leaves it after a migrate) unless --resume is given; on a terminal a progress
bar shows the bytes written. A failed save exits 125 with the reason; a VM that was running goes on running.
Restore with `memvisor run --incoming file:PATH` and the same --memory, --vcpus and --device.

Experimental, with `--hints`: with a balloon that negotiated free page hinting (`--device
virtio-balloon,id=b0,free-page-hint=on`) and a running VM, a hint round runs first (x-balloon-hint-start, until
the guest has hinted all its free 4 MiB blocks, or --hint-timeout, then x-balloon-hint-stop): the save leaves
out the pages hinted free and not written since (memvisor.vmm.snapshot.hinted_free), which the guest's allocator
has no use for. Not the default yet: in its first lab run the guest restored from such a snapshot reset while
it booted, which is not understood (tests/guest/test_snapshot.py keeps that test, run on request).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from memvisor.errors import MemvisorError

POLL = 0.2
HINT_TIMEOUT = 180.0  # a guest hints its free memory in well under a second on KVM, in 60-100 s under TCG
HINT_ANSWER = 10.0  # a driver that has not echoed the command id by then is not going to
SAVE_TIMEOUT = 3600.0
BAR_WIDTH = 30


def build_snapshot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", metavar="SOCK", help="the VM's QMP socket (memvisor run --qmp SOCK)")
    parser.add_argument("path", metavar="PATH", type=Path, help="the snapshot file to write")
    parser.add_argument("--resume", action="store_true", help="let the VM run again once it is saved")
    parser.add_argument("--hints", action="store_true",
                        help="experimental: ask the guest's balloon driver for free page hints first and leave the "
                             "hinted pages out of the file")  # fmt: skip
    parser.add_argument("--hint-timeout", type=float, default=HINT_TIMEOUT, metavar="SECONDS",
                        help=f"end the hint round after this long (default {HINT_TIMEOUT:.0f})")  # fmt: skip


def hint_round(qmp: Any, timeout: float = HINT_TIMEOUT, poll: float = POLL, answer: float = HINT_ANSWER) -> int:
    """Ask the guest for free page hints and end the round when it has sent them all, when it has not taken
    the round up within `answer` seconds, or after `timeout`; returns the bytes hinted (0 when the VM has no
    balloon with free page hinting: nothing to ask). Hints that came in before the end count either way."""
    from memvisor.control.client import QmpCommandError

    try:
        qmp.execute("x-balloon-hint-start")
    except QmpCommandError:  # no balloon, or its driver did not negotiate free-page-hint
        return 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < timeout:
        cycles = qmp.execute("x-query-balloon-hints")
        state = cycles[-1].get("state") if cycles else None
        if state in ("stopped", "done"):  # the guest sent STOP: it hinted every free block it could take
            break
        if state == "requested" and elapsed >= answer:  # the guest's driver does not take the round up
            break
        time.sleep(poll)
    status = qmp.execute("x-balloon-hint-stop")  # DONE: the guest takes its blocks back (writes are logged)
    return int(status.get("bytes", 0))


def progress_line(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#########.....]  45%  460M/1024M`."""
    fraction = min(1.0, done / total) if total else 0.0
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%  {done >> 20}M/{total >> 20}M"


def run_snapshot(args: argparse.Namespace) -> int:
    from memvisor.control.cli_verbs import _connect, human_size

    path = args.path.resolve()
    bar: TextIO | None = sys.stderr if sys.stderr.isatty() else None
    with _connect(args) as qmp:
        was_running = qmp.execute("query-status").get("status") == "running"
        if was_running and args.hints:
            hinted = hint_round(qmp, args.hint_timeout)
            if bar is not None and hinted:
                bar.write(f"the guest hinted {hinted >> 20}M free\n")
        qmp.execute("stop")
        qmp.execute("migrate", {"uri": f"file:{path}"})
        deadline = time.monotonic() + SAVE_TIMEOUT
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = qmp.execute("query-migrate")
            ram = info.get("ram", {})
            if bar is not None and ram:
                bar.write("\r" + progress_line(ram.get("transferred", 0), ram.get("total", 0)))
                bar.flush()
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(POLL)
        if bar is not None:
            bar.write("\n")
        if info.get("status") != "completed":
            if was_running:
                qmp.execute("cont")
            reason = info.get("error-desc") or f"status {info.get('status', 'unknown')}"
            raise MemvisorError(f"the snapshot to {path} failed: {reason}")
        if args.resume:
            qmp.execute("cont")
    ram = info.get("ram", {})
    state = "running" if args.resume else "paused (cont resumes it, quit ends it)"
    print(
        f"snapshot: {path}: {human_size(ram.get('transferred', 0))} of {human_size(ram.get('total', 0))} RAM written, "
        f"{human_size(ram.get('skipped', 0) * 4096)} hinted free left out, "
        f"{human_size(info.get('x-file-allocated', 0))} on disk, in {info.get('total-time', 0) / 1000:.1f} s; "
        f"the VM is {state}"
    )
    return 0
