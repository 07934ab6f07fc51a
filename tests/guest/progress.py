"""A record of which guest tests finished, written as they finish, so a guest-test stage whose lab crashed
can run only the tests that did not (scripts/guest-tests).

With MEMVISOR_GUEST_PROGRESS=FILE (a file in a folder shared with the lab), tests/guest/conftest.py appends one
line per test phase report: `<phase> <outcome> <seconds> <node id>`, flushed and fsynced at once, so the host
sees every line written before the lab died. A test is finished once its teardown is recorded; it failed if any of
its phases failed; its time is the sum of its phases' (what a stage that ran out of time prints, since pytest's own
--durations table never comes then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ENV = "MEMVISOR_GUEST_PROGRESS"


def record(path: Path, phase: str, outcome: str, nodeid: str, seconds: float = 0.0) -> None:
    """Append one phase report (the guest side; called from pytest_runtest_logreport)."""
    line = f"{phase} {outcome} {seconds:.1f} {nodeid}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Progress:
    """What a record says: the tests that finished (in order) and those among them that failed."""

    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict, compare=False)


def read(path: Path) -> Progress:
    """Parse a record; a missing file is no progress, a torn last line (the lab died mid-write) is ignored."""
    progress = Progress()
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return progress
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) != 4 or parts[0] not in ("setup", "call", "teardown"):
            continue
        phase, outcome, seconds, nodeid = parts
        try:
            progress.seconds[nodeid] = progress.seconds.get(nodeid, 0.0) + float(seconds)
        except ValueError:
            continue
        if outcome == "failed" and nodeid not in progress.failed:
            progress.failed.append(nodeid)
        if phase == "teardown" and nodeid not in progress.finished:
            progress.finished.append(nodeid)
    return progress


def times_table(progress: Progress, limit: int = 15) -> str:
    """The tests' times, slowest first (at most `limit` of them), and their sum."""
    ranked = sorted(progress.seconds.items(), key=lambda item: -item[1])
    lines = [f"  {seconds:7.1f} s  {nodeid}" for nodeid, seconds in ranked[:limit]]
    if len(ranked) > limit:
        lines.append(f"  ... and {len(ranked) - limit} more")
    lines.append(f"  {sum(progress.seconds.values()):7.1f} s  in all, {len(ranked)} tests")
    return "\n".join(lines)
