"""`memvisor manager` started as a user would, for the manual manager checks in this folder
(test_manager.py, manual_manager_check.py) and benchmarks/overcommit_scenario.py, and its
decision log read back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.guest.vm import REPO


@contextlib.contextmanager
def running_manager(sockets: Sequence[str | Path], budget: int, log: Path, stderr: Path, interval: int = 2,
                    extra: Sequence[str] = (), stop_timeout: float = 30) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """`memvisor manager --budget BUDGET --interval INTERVAL --log LOG [EXTRA...] SOCKET...` as a process, its
    stderr in `stderr` (a *.stderr file in a test's tmp_path is attached to its failure report); SIGTERM on the
    way out (the manager writes its --plot then), SIGKILL if it is not gone within `stop_timeout` s."""
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memvisor", "manager", "--budget", f"{budget >> 20}M", "--interval", str(interval),
             "--log", str(log), *extra, *map(str, sockets)],
            cwd=REPO, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_decisions(log: Path) -> list[dict[str, Any]]:
    """The manager's decision log (JSON lines) so far; a line still being written is skipped."""
    records = []
    for line in log.read_text().splitlines() if log.exists() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records
