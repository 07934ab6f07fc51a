"""Live migration of an idle 1G guest that filled 600M of tmpfs and freed it: bytes sent, time and downtime,
without and with free page hinting (memvisor to memvisor over unix:, both processes in one lab).

Run inside the lab (or on a host with hardware KVM):
    .venv/bin/memvisor lab --memory 6G -- .venv/bin/python benchmarks/migration_hints.py [--json OUT]

For each of `free-page-hint=off` and `=on`: boot the source with a balloon of that kind, fill 600M of tmpfs
with random data and remove it, start the destination with `--incoming unix:`, `migrate`, wait for
"completed", and report query-migrate's ram.transferred against RAM, total-time, downtime and the pages
skipped by reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.guest.vm import GuestVM, wait_until  # noqa: E402


def migrate_once(work: Path, hinting: bool) -> dict[str, Any]:
    devices = [f"virtio-balloon,id=balloon0,free-page-hint={'on' if hinting else 'off'}"]
    src_dir, dst_dir = work / "src", work / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    channel = work / "mig.sock"
    with GuestVM(src_dir, memory="1G", devices=devices) as source:
        source.check("mkdir -p /mnt/f && mount -t tmpfs -o size=700M tmpfs /mnt/f && "
                     "dd if=/dev/urandom of=/mnt/f/fill bs=1M count=600 2>/dev/null && rm /mnt/f/fill && sync")  # fmt: skip
        time.sleep(2)
        holder: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: holder.update(vm=GuestVM(
            dst_dir, memory="1G", devices=devices, extra=["--incoming", f"unix:{channel}"], boot_timeout=600)))
        thread.start()
        wait_until(channel.exists, timeout=120, interval=0.2, what="the destination to listen")
        source.cmd("migrate-set-parameters", max_bandwidth=0)
        source.cmd("migrate", uri=f"unix:{channel}")
        info = wait_until(lambda: (i := source.cmd("query-migrate"))["status"] in ("completed", "failed") and i,
                          timeout=600, interval=0.5, what="the migration")  # fmt: skip
        thread.join(600)
        dest = holder.get("vm")
        if dest is not None:
            dest.check("echo alive")
            dest.close()
    ram = info.get("ram", {})
    return {"free-page-hint": hinting, "status": info["status"], "transferred": ram.get("transferred"),
            "ram": ram.get("total"), "ratio": round(ram.get("transferred", 0) / max(ram.get("total", 1), 1), 4),
            "total-time-ms": info.get("total-time"), "downtime-ms": info.get("downtime"),
            "normal": ram.get("normal"), "duplicate": ram.get("duplicate"),
            "skipped": ram.get("x-skipped-pages"), "passes": ram.get("dirty-sync-count")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for hinting in (False, True):
        with tempfile.TemporaryDirectory() as work:
            result = migrate_once(Path(work), hinting)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
