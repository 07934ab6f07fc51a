"""Live migration of a running Debian guest between two memvisor processes in one lab, over `unix:PATH`.

The source guest keeps writing a counter file in a loop and holds a 64 MiB tmpfs file of random data; the
destination waits with `--incoming unix:PATH`. After QMP `migrate` completes, the destination runs the same
boot (boot_id equal, uptime continues), the tmpfs file's checksum is the one taken before, the writer loop
goes on, and the source is paused in "postmigrate". With MEMVISOR_MIGRATION_HINTING=1 a second variant has the
balloon's free page hinting on, so a hint round runs during the migration; query-migrate's counts are printed (bytes sent against RAM, pages skipped by reason).
"""

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.vm import GuestVM, wait_until

WRITER = ("(i=0; while true; do echo $i > /mnt/t/counter; i=$((i+1)); sleep 0.1; done) "
          ">/dev/null 2>&1 </dev/null &")  # fmt: skip


# The hinting variant failed 2 of its 4 lab runs (the source guest reset during the first pass, nothing on its
# console: the open guest-reset bug of issue 13) and stays out of CI until that is fixed:
# MEMVISOR_MIGRATION_HINTING=1 runs it.
VARIANTS = [pytest.param([], id="plain")]
if os.environ.get("MEMVISOR_MIGRATION_HINTING") == "1":
    VARIANTS.append(pytest.param(["virtio-balloon,id=balloon0,free-page-hint=on"], id="hinting"))


@pytest.mark.parametrize("devices", VARIANTS)
def test_live_migration_over_unix_keeps_the_guest_its_files_and_its_processes(tmp_path: Path, devices: list[str]) -> None:
    source_dir, dest_dir = tmp_path / "source", tmp_path / "dest"
    source_dir.mkdir()
    dest_dir.mkdir()
    channel = tmp_path / "migration.sock"
    with GuestVM(source_dir, memory="1G", devices=devices) as source:
        source.check("mkdir -p /mnt/t && mount -t tmpfs -o size=128M tmpfs /mnt/t")
        source.check("dd if=/dev/urandom of=/mnt/t/data bs=1M count=64 2>/dev/null")
        checksum = source.check("sha256sum /mnt/t/data").split()[0]
        source.check(WRITER)
        boot_id = source.check("cat /proc/sys/kernel/random/boot_id").strip()
        uptime_before = float(source.check("cut -d' ' -f1 /proc/uptime"))

        started: dict[str, Any] = {}

        def start_destination() -> None:
            try:
                started["vm"] = GuestVM(dest_dir, memory="1G", devices=devices,
                                        extra=["--incoming", f"unix:{channel}"], boot_timeout=300)  # fmt: skip
            except BaseException as error:  # noqa: BLE001 - reported by the test below
                started["error"] = error

        thread = threading.Thread(target=start_destination)
        thread.start()
        try:
            wait_until(lambda: channel.exists() or "error" in started, timeout=120, interval=0.2,
                       what="the destination to listen")  # fmt: skip
            assert "error" not in started, started.get("error")
            began = time.monotonic()
            source.cmd("migrate-set-parameters", downtime_limit=500, max_bandwidth=0)
            source.cmd("migrate", uri=f"unix:{channel}")

            def finished() -> Any:
                info = source.cmd("query-migrate")
                return info if info.get("status") in ("completed", "failed", "cancelled") else None

            info = wait_until(finished, timeout=180, interval=0.5, what="the migration to end")
            took = time.monotonic() - began
            assert info["status"] == "completed", (info.get("error-desc"), info)
            ram = info["ram"]
            print(f"migration: {took:.1f} s, total-time {info['total-time']} ms, downtime {info['downtime']} ms, "
                  f"setup {info['setup-time']} ms; sent {ram['transferred'] >> 20} MiB for {ram['total'] >> 20} "
                  f"MiB of RAM; normal {ram['normal']} pages, zero {ram['duplicate']}, passes "
                  f"{ram['dirty-sync-count']}, skipped {ram['x-skipped-pages']}, {ram['mbps']} Mbps, "
                  f"dirty log {ram['x-dirty-log']}")  # fmt: skip
            assert source.cmd("query-status")["status"] == "postmigrate"
            statuses = [event["data"]["status"] for event in source.events("MIGRATION")]
            assert statuses[0] == "setup" and statuses[-1] == "completed", statuses
            assert ram["transferred"] < ram["total"]  # never-touched memory is not sent
            assert ram["transferred"] >= 64 << 20  # the random tmpfs file is
        finally:
            thread.join(330)
        assert "error" not in started, started.get("error")
        with started["vm"] as dest:
            assert dest.check("cat /proc/sys/kernel/random/boot_id").strip() == boot_id  # the same boot
            assert float(dest.check("cut -d' ' -f1 /proc/uptime")) >= uptime_before  # uptime continues
            assert dest.check("sha256sum /mnt/t/data").split()[0] == checksum
            first = int(dest.check("cat /mnt/t/counter"))
            wait_until(lambda: int(dest.check("cat /mnt/t/counter")) > first, timeout=30, interval=0.5,
                       what="the guest's writer loop to go on after the migration")  # fmt: skip
            assert dest.cmd("query-status")["status"] == "running"
            console = dest.console_text()
            assert "soft lockup" not in console and "BUG:" not in console, console[-2000:]
