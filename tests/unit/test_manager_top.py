"""`memvisor top` against memvisor's FakeMachine behind the real QMP server and QEMU 7.2's recorded replies."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from memvisor.manager.top import Top, render, run_top

from .manager_fakes import FakeGuest, RecordedQemu, socket_folder

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with socket_folder("top-") as path:
        yield path


def memvisor_vm(sock_dir: str, name: str) -> FakeGuest:
    """A memvisor VM as top sees it: 1G, a balloon (no statistics until report_stats), virtio-mem vm0 (4G max,
    2M blocks)."""
    return FakeGuest(sock_dir, name, virtio_mem=("vm0", 4 * GiB, 2 * MiB))


def args(*sockets: str, once: bool = True, poll: int | None = None, interval: float = 2.0) -> argparse.Namespace:
    return argparse.Namespace(sockets=list(sockets), once=once, poll=poll, interval=interval)


def test_once_shows_balloon_guest_stats_host_memory_and_virtio_mem(sock_dir: str) -> None:
    vm = memvisor_vm(sock_dir, "web")
    qemu = RecordedQemu(os.path.join(sock_dir, "qemu.sock"))
    try:
        vm.machine.fake_balloon.set_target_bytes(768 * MiB)
        vm.report_stats(available=500 * MiB, free=300 * MiB, age=3)
        out = io.StringIO()
        assert run_top(args(vm.path, qemu.path), out=out) == 0
        lines = out.getvalue().splitlines()
        assert lines[1].split() == ["VM", "KIND", "ACTUAL", "BOOT", "AVAILABLE", "FREE", "STATS", "HOST", "(FROM)",
                                    "VIRTIO-MEM"]  # fmt: skip
        web = next(line for line in lines if line.startswith("web "))
        # host: x-query-host-memory's total (the fake holds the balloon's actual); virtio-mem size/requested
        cells = web.split()
        assert cells[:6] + cells[7:] == ["web", "memvisor", "768M", "1024M", "500M", "300M", "ago", "768M",
                                         "x-query-host-memory", "0M/0M"]  # fmt: skip
        assert cells[6].endswith("s") and 3 <= int(cells[6][:-1]) <= 9  # 1 s resolution, and a slow run ages it
        row = next(line for line in lines if line.startswith("qemu "))
        cells = row.split()
        # QEMU 7.2 had not polled: stats off, no numbers; host memory from RSS (the server's pid: this process)
        assert cells[:7] == ["qemu", "qemu", "1024M", "1024M", "-", "-", "off"]
        assert cells[-2:] == ["RSS", "0M/0M"] and int(cells[7].rstrip("M")) > 0
        assert "stats polling is off for some VMs" in lines[-1]
        # read-only: no balloon, no polling change, no guest command, no x- command for QEMU
        sent = [name for name, _ in qemu.commands]
        assert "balloon" not in sent and "qom-set" not in sent and not any(n.startswith("x-") for n in sent)
        assert vm.machine.fake_balloon.actual_bytes() == 768 * MiB
        assert vm.machine.fake_balloon.stats_polling_interval() == 0
    finally:
        vm.stop()
        qemu.close()


def test_poll_turns_stats_polling_on(sock_dir: str) -> None:
    vm = memvisor_vm(sock_dir, "web")
    try:
        assert run_top(args(vm.path, poll=2), out=io.StringIO()) == 0
        assert vm.machine.fake_balloon.stats_polling_interval() == 2
    finally:
        vm.stop()


def test_a_vm_that_cannot_be_read_shows_its_error_and_is_tried_again(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "late.sock")
    top = Top([path])
    try:
        rows = top.read()
        assert rows[0].error is not None and "no QMP socket" in rows[0].error
        screen = render(rows, time.time())
        assert screen.splitlines()[-1].startswith("late  no QMP socket at")
        out = io.StringIO()
        assert run_top(args(path), out=out) == 1  # --once says a VM could not be read
        vm = memvisor_vm(sock_dir, "late")
        try:
            rows = top.read()
            assert rows[0].error is None and rows[0].sample is not None and rows[0].sample.actual == GiB
            vm.stop()
            rows = top.read()  # the VM went away: its error again, not an exception
            assert rows[0].error is not None
        finally:
            vm.stop()
    finally:
        top.close()


def test_refreshes_until_interrupted(sock_dir: str) -> None:
    vm = memvisor_vm(sock_dir, "web")
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt
        vm.machine.fake_balloon.set_target_bytes(512 * MiB)

    try:
        out = io.StringIO()
        assert run_top(args(vm.path, once=False, interval=0.5), out=out, sleep=sleep) == 0
        text = out.getvalue()
        assert naps == [0.5, 0.5]
        screens = text.split("memvisor top  ")[1:]
        assert len(screens) == 2  # two screens (no clearing: not a terminal)
        assert " 1024M " in screens[0].splitlines()[2] and " 512M " in screens[1].splitlines()[2]
    finally:
        vm.stop()


def test_cli_once_as_a_process(sock_dir: str) -> None:
    vm = memvisor_vm(sock_dir, "web")
    try:
        done = subprocess.run([sys.executable, "-m", "memvisor", "top", "--once", os.path.join(sock_dir, "*.sock")],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert any(line.startswith("web ") and "memvisor" in line for line in done.stdout.splitlines())
        bad = subprocess.run([sys.executable, "-m", "memvisor", "top", "--once", "--poll", "0", vm.path],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert bad.returncode != 0 and "--poll must be between 1 and 3600" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        vm.stop()
