"""`memvisor migrate SOCK URI`: live-migrate the VM behind QMP socket SOCK to URI (tcp:HOST:PORT, unix:PATH).

Starts QMP `migrate`, polls `query-migrate` and shows one progress line (bytes sent, pass, dirty rate,
expected downtime; rewritten in place on a terminal, every few seconds otherwise); exits 0 once the
migration completed (the source is left in "postmigrate"), 125 with the reason when it failed or was
cancelled (the source runs on).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from memvisor.errors import MemvisorError

POLL = 0.25
MIGRATE_TIMEOUT = 3600.0


def build_migrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", metavar="SOCK", help="the source VM's QMP socket (memvisor run --qmp SOCK)")
    parser.add_argument("uri", metavar="URI", help="where the destination listens: tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--downtime-limit", type=int, metavar="MS", help="longest pause of the guest (ms)")
    parser.add_argument("--max-bandwidth", type=int, metavar="BYTES", help="bytes per second at most")


def progress_line(info: dict[str, Any]) -> str:
    """`active  pass 3  412M/1024M sent  dirty 1200 pages/s  expected downtime 40 ms  850.1 Mbps`."""
    ram = info.get("ram", {})
    return (f"{info.get('status', '?'):<10} pass {ram.get('dirty-sync-count', 0)}  "
            f"{ram.get('transferred', 0) >> 20}M/{ram.get('total', 0) >> 20}M sent  "
            f"dirty {ram.get('dirty-pages-rate', 0)} pages/s  "
            f"expected downtime {info.get('expected-downtime', info.get('downtime', 0))} ms  "
            f"{ram.get('mbps', 0):.1f} Mbps")  # fmt: skip


def run_migrate(args: argparse.Namespace) -> int:
    from memvisor.control.cli_verbs import _connect, human_size

    terminal = sys.stderr.isatty()
    with _connect(args) as qmp:
        parameters = {name: value for name, value in (("downtime-limit", args.downtime_limit),
                      ("max-bandwidth", args.max_bandwidth)) if value is not None}  # fmt: skip
        if parameters:
            qmp.execute("migrate-set-parameters", parameters)
        qmp.execute("migrate", {"uri": args.uri})
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        info: dict[str, Any] = {}
        shown = 0.0
        while time.monotonic() < deadline:
            info = qmp.execute("query-migrate")
            if terminal:
                sys.stderr.write("\r" + progress_line(info) + "\x1b[K")
                sys.stderr.flush()
            elif time.monotonic() - shown >= 2.0:
                print(progress_line(info), file=sys.stderr, flush=True)
                shown = time.monotonic()
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(POLL)
        if terminal:
            sys.stderr.write("\n")
        if info.get("status") != "completed":
            reason = info.get("error-desc") or f"status {info.get('status', 'unknown')} after {MIGRATE_TIMEOUT:.0f} s"
            raise MemvisorError(f"the migration to {args.uri} failed: {reason}; the source VM runs on")
    ram = info.get("ram", {})
    skipped = ram.get("x-skipped-pages", {})
    print(f"migrate: {args.uri}: completed in {info.get('total-time', 0) / 1000:.1f} s, downtime "
          f"{info.get('downtime', 0)} ms, {human_size(ram.get('transferred', 0))} sent for "
          f"{human_size(ram.get('total', 0))} of RAM in {ram.get('dirty-sync-count', 0)} passes; pages not sent: "
          + ", ".join(f"{name} {count}" for name, count in skipped.items())
          + "; the source is paused (postmigrate)")  # fmt: skip
    return 0
