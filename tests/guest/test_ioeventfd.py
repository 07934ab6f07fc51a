"""MEMVISOR_IOEVENTFD=1 (memvisor/vmm/ioeventfd.py): a guest boots and the balloon and virtio-mem work with queue
notifies through ioeventfds and interrupts through irqfds, and the notifies really stopped exiting to Python.

Opt-in like the switch itself, so CI is unaffected until the fast path is measured: it runs only with
MEMVISOR_IOEVENTFD=1 in its environment (and skips otherwise, also in CI and the lab), e.g.

    memvisor lab --memory 6G --timeout 800 -- env MEMVISOR_IOEVENTFD=1 PYTHONUNBUFFERED=1 \
        .venv/bin/pytest tests/guest/test_ioeventfd.py -v -s

One 1G guest with a balloon and a 2G virtio-mem device. Measured and
printed (pytest -s, or the lab's output) for the record: exits to Python per GiB inflated and per GiB plugged
(x-query-exits' kinds, as benchmarks/memory_vs_qemu.py counts them) and the notifies and interrupts that went
through eventfds instead ("eventfd"). The exit path's numbers before this switch: 5,124 per GiB inflated, 38
per GiB plugged (BENCHMARKS.md).
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.balloon_wait import move_balloon
from tests.guest.vm import GuestVM, wait_until

pytestmark = [
    pytest.mark.guest,
    pytest.mark.may_skip,  # right in CI too: the switch is experimental and off there
    pytest.mark.skipif(os.environ.get("MEMVISOR_IOEVENTFD") != "1",
                       reason="the eventfd fast path is opt-in: run with MEMVISOR_IOEVENTFD=1"),  # fmt: skip
]

MiB = 1 << 20
GiB = 1 << 30
RAM = 1 * GiB
TARGET = 512 * MiB
PFNS_PER_BUFFER = 256  # Linux's virtio_balloon: VIRTIO_BALLOON_ARRAY_PFNS_MAX pages per inflate buffer
TMPFS = "/mnt/ioeventfd-test"
DEVICES = ["virtio-balloon,id=balloon0", "virtio-mem,id=vm0,max-size=2G,requested-size=0"]


def report(message: str) -> None:
    print(f"[ioeventfd] {message}", file=sys.stderr)


def exits(vm: GuestVM) -> tuple[int, dict[str, int]]:
    """(exits to Python in all, the eventfd counts) now."""
    reply: dict[str, Any] = vm.cmd("x-query-exits")
    assert "eventfd" in reply, f"x-query-exits has no eventfd part: the fast path is off ({reply})"
    return int(reply["total"]), dict(reply["eventfd"])


@pytest.mark.timeout(900)
def test_balloon_and_virtio_mem_work_with_notifies_through_ioeventfds(tmp_path: Path) -> None:
    with GuestVM(tmp_path, memory="1G", devices=DEVICES) as vm:
        total, eventfd = exits(vm)
        report(f"after boot: {total} exits to Python, eventfd {eventfd}")
        assert eventfd["notifies"] > 0 and eventfd["interrupts"] > 0  # the agent's console used them to boot

        # --- balloon: touch 600M and free it (the host then holds it), inflate to 512M, deflate ------------
        vm.check(f"mkdir -p {TMPFS} && mount -t tmpfs -o size=100% tmpfs {TMPFS}")
        vm.check(f"dd if=/dev/urandom of={TMPFS}/keep bs=1M count=32 2>/dev/null")
        kept = vm.check(f"sha256sum {TMPFS}/keep").split()[0]
        vm.check(f"dd if=/dev/zero of={TMPFS}/f bs=1M count=600 && rm {TMPFS}/f", timeout=600)
        host_before = vm.host_memory()
        before = exits(vm)
        seconds = move_balloon(vm, TARGET, "inflate 1G -> 512M").seconds
        after = exits(vm)
        ballooned = RAM - int(vm.cmd("query-balloon")["actual"])
        host_inflated = vm.host_memory()
        buffers = ballooned // 4096 // PFNS_PER_BUFFER
        notifies = after[1]["notifies"] - before[1]["notifies"]
        per_gib = (after[0] - before[0]) * GiB / ballooned
        report(f"inflate 1G -> 512M: {seconds:.2f} s, {after[0] - before[0]} exits to Python ({per_gib:.0f} per GiB "
               f"inflated), {notifies} notifies and {after[1]['interrupts'] - before[1]['interrupts']} interrupts "
               f"through eventfds, {buffers} buffers; host memory {host_before // MiB} -> {host_inflated // MiB} MiB")  # fmt: skip
        assert host_before - host_inflated >= 0.9 * ballooned, "the host did not get the ballooned memory back"
        # Linux's driver kicks once per buffer and waits for it: every kick came through an ioeventfd.
        assert notifies >= 0.9 * buffers, f"{notifies} notifies through eventfds for {buffers} inflate buffers"
        seconds = move_balloon(vm, RAM, "deflate 512M -> 1G").seconds
        report(f"deflate 512M -> 1G: {seconds:.2f} s")
        assert vm.check(f"sha256sum {TMPFS}/keep").split()[0] == kept, "the guest's data changed"

        # --- virtio-mem: plug 1G, check the guest sees it, unplug ------------------------------------------
        boot_total = vm.meminfo()["MemTotal"]
        before = exits(vm)
        started = time.monotonic()
        vm.cmd("qom-set", path="vm0", property="requested-size", value=GiB)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == GiB, timeout=180, interval=0.2,
                   what="vm0 size to reach 1G")  # fmt: skip
        seconds = time.monotonic() - started
        after = exits(vm)
        report(f"plug 0 -> 1G: {seconds:.2f} s, {after[0] - before[0]} exits to Python per GiB plugged, "
               f"{after[1]['notifies'] - before[1]['notifies']} notifies through eventfds")  # fmt: skip
        wait_until(lambda: vm.meminfo()["MemTotal"] >= boot_total + GiB, timeout=60, what="MemTotal +1G")
        assert after[1]["notifies"] > before[1]["notifies"]
        vm.check("dd if=/dev/zero of=/dev/null bs=300M count=1 2>&1")
        vm.cmd("qom-set", path="vm0", property="requested-size", value=0)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == 0, timeout=300, interval=0.5,
                   what="vm0 size to fall to 0")  # fmt: skip
        assert vm.check("echo alive") == "alive\n"
