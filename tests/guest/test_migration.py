"""Live migration of a running Debian guest between two memvisor processes in one lab, over `unix:PATH`, over
loopback `tcp:127.0.0.1:PORT` and over TCP between two network namespaces the test creates (a veth pair, traffic
only inside them: tests/guest/netns.py); and `migrate_cancel` in the middle of the first RAM pass.

The source guest keeps writing a counter file in a loop and holds a 64 MiB tmpfs file of random data; the
destination waits with `--incoming unix:PATH` or `--incoming tcp:127.0.0.1:PORT`. After QMP `migrate`
completes, the destination runs the same boot (boot_id equal, uptime continues), the tmpfs file's checksum is
the one taken before, the writer loop goes on, and the source is paused in "postmigrate". The tcp variant's
guests have a balloon, inflated by 64 MiB on the source before the migration: its pages are not sent, the
destination's `query-balloon` reads what the source's did, and the balloon inflates and deflates there.
A further unix variant has the balloon's free page hinting on, so a hint round
runs during the migration; query-migrate's counts are printed (bytes sent against RAM, pages skipped by reason).
In the netns variant the source memvisor runs in namespace mvmig-src-PID and the destination in mvmig-dst-PID
(`ip netns exec`; their QMP sockets stay in the filesystem, which namespaces do not split), the destination
listens on its veth address and the veth ends' byte counters show the migration's bytes went through them.

The cancel test caps the bandwidth at 8 MiB/s (as scripts/stress-guest-reset does), cancels once the first pass
is moving RAM, and checks that the source runs on untouched and that the destination ends by itself with 125.

127.0.0.1 needs the loopback interface up: the lab's agent brings it up (memvisor/lab/loopback.py), as any
booted host has it.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.balloon_wait import move_balloon
from tests.guest.netns import NetnsPair, netns_pair, tcp_table_listens
from tests.guest.vm import REPO, GuestVM, wait_until

MiB = 1 << 20
RAM = 1024 * MiB
PAGE = 4096
WRITER = ("(i=0; while true; do echo $i > /mnt/t/counter; i=$((i+1)); sleep 0.1; done) "
          ">/dev/null 2>&1 </dev/null &")  # fmt: skip
BALLOON = "virtio-balloon,id=balloon0"
ENDED = ("completed", "failed", "cancelled")
# migrate_cancel's test: the 64 MiB random file alone takes 8 s at this rate, so the first pass is still
# moving RAM when the cancel comes (scripts/stress-guest-reset's HINT_MIGRATION_BANDWIDTH).
CANCEL_BANDWIDTH = 8 * MiB


# The hinting variant failed 2 of its 4 lab runs on the lab's emulated nested paging (the source guest reset
# during the first pass: issue 13); on shadow paging, the lab's default since 2026-12-02, it passed (146 MiB sent
# for 1 GiB, 172 MiB skipped as hinted free) and runs in CI.
# (channel, devices, balloon: inflate before and check the balloon after the migration)
# The plain guest (no devices) migrates between the namespaces: a plain variant over unix: as well would add
# about 2.5 min to CI's guest stage and nothing the hinting variant (unix:) and the namespace one do not cover.
HINTING = "virtio-balloon,id=balloon0,free-page-hint=on"
VARIANTS = [pytest.param("tcp", [BALLOON], True, id="tcp-balloon"),
            pytest.param("unix", [HINTING], False, id="unix-hinting"),
            pytest.param("netns", [], False, id="netns-tcp")]  # fmt: skip
# The destination's port in its own fresh namespace, where nothing else listens.
NETNS_PORT = 4444


# --- loopback TCP ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick; the destination binds it with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_listening(port: int) -> bool:
    """A socket listens on `port` (state 0A in /proc/net/tcp). Read without connecting: the destination takes
    one connection only, and a probe would be that one."""
    return tcp_table_listens(Path("/proc/net/tcp").read_text(), port)


def incoming(channel: str, tmp_path: Path, pair: NetnsPair | None) -> tuple[str, Callable[[], bool]]:
    """The destination's URI for `channel` ("unix", "tcp" or "netns": `pair`'s) and a check that it listens
    (for "netns", in the destination's namespace: /proc/net/tcp is per namespace)."""
    if channel == "unix":
        path = tmp_path / "migration.sock"
        return f"unix:{path}", path.exists
    if channel == "netns":
        assert pair is not None
        return f"tcp:{pair.dest.address}:{NETNS_PORT}", lambda: pair.dest.listens(NETNS_PORT)
    port = free_port()
    return f"tcp:127.0.0.1:{port}", lambda: tcp_listening(port)


@pytest.fixture
def veth_pair() -> Iterator[NetnsPair]:
    """Two network namespaces joined by a veth pair, removed after the test (whatever happened)."""
    with netns_pair() as pair:
        yield pair


def lo_bytes() -> int:
    """Bytes sent over this (the lab's own) namespace's loopback."""
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


def traffic_stayed_inside(pair: NetnsPair, before: dict[str, tuple[int, int]], lo_before: int, sent: int) -> None:  # fmt: skip
    """The veth ends carried at least the `sent` bytes (source's tx, destination's rx, both counting headers
    too) and this namespace's loopback less than that."""
    out = pair.source.byte_counts()[1] - before["source"][1]
    into = pair.dest.byte_counts()[0] - before["dest"][0]
    lo = lo_bytes() - lo_before
    print(f"veth: the source's end sent {out >> 20} MiB, the destination's received {into >> 20} MiB "
          f"(the migration sent {sent >> 20} MiB); the lab's loopback carried {lo >> 20} MiB meanwhile")  # fmt: skip
    assert out >= sent and into >= sent, (out, into, sent)
    assert lo < sent, (lo, sent)


# --- the guest ------------------------------------------------------------------------------------------------


def prepare(source: GuestVM) -> str:
    """The 64 MiB random tmpfs file and the writer loop; return the file's checksum."""
    source.check("mkdir -p /mnt/t && mount -t tmpfs -o size=128M tmpfs /mnt/t")
    source.check("dd if=/dev/urandom of=/mnt/t/data bs=1M count=64 2>/dev/null")
    checksum = source.check("sha256sum /mnt/t/data").split()[0]
    source.check(WRITER)
    return checksum


def counter(vm: GuestVM) -> int:
    return int(vm.check("cat /mnt/t/counter"))


def writer_goes_on(vm: GuestVM, when: str) -> None:
    first = counter(vm)
    wait_until(lambda: counter(vm) > first, timeout=30, interval=0.5,
               what=f"the guest's writer loop to go on {when}")  # fmt: skip


def migration_ended(vm: GuestVM) -> Callable[[], Any]:
    def ended() -> Any:
        info = vm.cmd("query-migrate")
        return info if info.get("status") in ENDED else None

    return ended


# --- the tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channel", "devices", "balloon"), VARIANTS)
def test_live_migration_keeps_the_guest_its_files_and_its_processes(tmp_path: Path, request: pytest.FixtureRequest,
                                                                    channel: str, devices: list[str],
                                                                    balloon: bool) -> None:  # fmt: skip
    source_dir, dest_dir = tmp_path / "source", tmp_path / "dest"
    source_dir.mkdir()
    dest_dir.mkdir()
    pair: NetnsPair | None = request.getfixturevalue("veth_pair") if channel == "netns" else None
    source_ns, dest_ns = (pair.source.netns, pair.dest.netns) if pair else (None, None)
    with GuestVM(source_dir, memory="1G", devices=devices, netns=source_ns) as source:
        checksum = prepare(source)
        balloon_before = RAM
        if balloon:  # the balloon's pages are not sent; its state is
            balloon_before = move_balloon(source, RAM - 64 * MiB, "inflate by 64 MiB on the source").actual
        boot_id = source.check("cat /proc/sys/kernel/random/boot_id").strip()
        uptime_before = float(source.check("cut -d' ' -f1 /proc/uptime"))

        # A TCP port is picked just before the destination starts.
        uri, listening = incoming(channel, tmp_path, pair)
        started: dict[str, Any] = {}

        def start_destination() -> None:
            try:
                started["vm"] = GuestVM(dest_dir, memory="1G", devices=devices, extra=["--incoming", uri],
                                        boot_timeout=300, netns=dest_ns)  # fmt: skip
            except BaseException as error:  # noqa: BLE001 - reported by the test below
                started["error"] = error

        thread = threading.Thread(target=start_destination)
        thread.start()
        try:
            wait_until(lambda: listening() or "error" in started, timeout=120, interval=0.2,
                       what="the destination to listen")  # fmt: skip
            assert "error" not in started, started.get("error")
            veth_before = {"source": pair.source.byte_counts(), "dest": pair.dest.byte_counts()} if pair else {}  # fmt: skip
            lo_before = lo_bytes()
            began = time.monotonic()
            source.cmd("migrate-set-parameters", downtime_limit=500, max_bandwidth=0)
            source.cmd("migrate", uri=uri)
            info = wait_until(migration_ended(source), timeout=180, interval=0.5, what="the migration to end")
            took = time.monotonic() - began
            assert info["status"] == "completed", (info.get("error-desc"), info)
            ram = info["ram"]
            print(f"migration over {channel}: {took:.1f} s, total-time {info['total-time']} ms, downtime "
                  f"{info['downtime']} ms, setup {info['setup-time']} ms; sent {ram['transferred'] >> 20} MiB for "
                  f"{ram['total'] >> 20} MiB of RAM; normal {ram['normal']} pages, zero {ram['duplicate']}, passes "
                  f"{ram['dirty-sync-count']}, skipped {ram['x-skipped-pages']}, {ram['mbps']} Mbps, "
                  f"dirty log {ram['x-dirty-log']}")  # fmt: skip
            assert source.cmd("query-status")["status"] == "postmigrate"
            statuses = [event["data"]["status"] for event in source.events("MIGRATION")]
            assert statuses[0] == "setup" and statuses[-1] == "completed", statuses
            assert ram["transferred"] < ram["total"]  # never-touched memory is not sent
            assert ram["transferred"] >= 64 << 20  # the random tmpfs file is
            if balloon:  # the first pass skips every inflated page (a later one may count some again)
                inflated = (RAM - balloon_before) // PAGE
                assert ram["x-skipped-pages"]["balloon"] >= 0.9 * inflated, (ram["x-skipped-pages"], inflated)
        finally:
            thread.join(330)
        assert "error" not in started, started.get("error")
        if pair:  # read once the destination runs: every byte sent has arrived
            traffic_stayed_inside(pair, veth_before, lo_before, ram["transferred"])
        with started["vm"] as dest:
            assert dest.check("cat /proc/sys/kernel/random/boot_id").strip() == boot_id  # the same boot
            assert float(dest.check("cut -d' ' -f1 /proc/uptime")) >= uptime_before  # uptime continues
            assert dest.check("sha256sum /mnt/t/data").split()[0] == checksum
            writer_goes_on(dest, "after the migration")
            assert dest.cmd("query-status")["status"] == "running"
            if balloon:  # the balloon came along and works: the same size, then a small inflate and deflate
                assert int(dest.cmd("query-balloon")["actual"]) == balloon_before
                move_balloon(dest, RAM - 128 * MiB, "inflate by 64 MiB more on the destination")
                assert move_balloon(dest, RAM, "deflate to 1G on the destination").actual == RAM
                writer_goes_on(dest, "after the balloon moved")
            console = dest.console_text()
            assert "soft lockup" not in console and "BUG:" not in console, console[-2000:]


def test_migrate_cancel_in_the_first_pass_leaves_the_source_running_and_ends_the_destination(
    tmp_path: Path,
) -> None:
    source_dir, dest_dir = tmp_path / "source", tmp_path / "dest"
    source_dir.mkdir()
    dest_dir.mkdir()
    with GuestVM(source_dir, memory="1G") as source:
        checksum = prepare(source)
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        # The destination only receives (it never runs the guest here): a bare process, its exit status wanted.
        dest_stderr = dest_dir / "memvisor.stderr"
        argv = [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", "1G", "--vcpus", "1",
                "--console", str(dest_dir / "console.log"), "--incoming", uri]  # fmt: skip
        with dest_stderr.open("wb") as err:
            dest = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            wait_until(lambda: tcp_listening(port) or dest.poll() is not None, timeout=120, interval=0.2,
                       what="the destination to listen")  # fmt: skip
            assert dest.poll() is None, f"the destination exited {dest.returncode}: {dest_stderr.read_text()}"
            source.cmd("migrate-set-parameters", max_bandwidth=CANCEL_BANDWIDTH)
            source.cmd("migrate", uri=uri)

            def moving_ram() -> Any:
                info = source.cmd("query-migrate")
                moving = info.get("status") == "active" and info["ram"]["transferred"] >= 4 * MiB
                return info if moving or info.get("status") in ENDED else None

            info = wait_until(moving_ram, timeout=60, interval=0.2, what="the first pass to move RAM")
            assert info["status"] == "active", (info.get("error-desc"), info)
            assert info["ram"]["dirty-sync-count"] == 1, info  # still the first pass
            source.cmd("migrate_cancel")
            info = wait_until(migration_ended(source), timeout=30, interval=0.2,
                              what="the migration to end after migrate_cancel")  # fmt: skip
            print(f"migrate_cancel: {info['status']} after {info['total-time']} ms, {info['ram']['transferred'] >> 20} "
                  f"MiB sent: {info.get('error-desc')}")  # fmt: skip
            assert info["status"] == "cancelled", (info.get("error-desc"), info)
            # The destination notices the source is gone and ends by itself: 125, one line naming the cause.
            try:
                status = dest.wait(timeout=60)
            except subprocess.TimeoutExpired:
                tail = dest_stderr.read_text(errors="replace")[-2000:]
                pytest.fail(f"the destination still runs 60 s after migrate_cancel: {tail}")
            stderr = dest_stderr.read_text(errors="replace")
            assert status == 125, (status, stderr)
            assert "the incoming migration failed" in stderr, stderr
        finally:
            if dest.poll() is None:
                dest.kill()
                dest.wait()
        # The source runs on as if nothing had happened.
        assert source.cmd("query-status")["status"] == "running"
        statuses = [event["data"]["status"] for event in source.events("MIGRATION")]
        assert statuses[0] == "setup" and statuses[-1] == "cancelled" and "completed" not in statuses, statuses
        writer_goes_on(source, "after migrate_cancel")
        assert source.check("sha256sum /mnt/t/data").split()[0] == checksum
        assert source.check("echo alive").strip() == "alive"
