"""Issue 10: the overcommit manager drives a QEMU 7.2 guest (not collected by CI: run it by hand in the lab).

    .venv/bin/memvisor lab --memory 6G -- .venv/bin/pytest tests/guest/manual_manager_check.py -v -s

A QEMU 7.2 guest (virtio-balloon-pci, no agent channel for the manager) runs alone under a 640M budget: the
manager detects it as QEMU, turns its stats polling on and takes its idle memory back. It stays out of CI because
QEMU's guest needs its virtio_pci module loaded through the benchmark's agent first (45 s of lab time), and beside
memvisor guests on the lab's two cores that setup timed out. The two-memvisor-guest check is
tests/guest/test_manager.py; both start the manager with tests/guest/manager_run.py.
"""

import time
from pathlib import Path

import pytest

from tests.guest.manager_run import read_decisions, running_manager
from tests.guest.vm import wait_until

MiB = 1 << 20

pytestmark = pytest.mark.guest


def test_manager_drives_a_qemu_guest(tmp_path: Path) -> None:
    """First in the file, alone: with the two memvisor guests running, QEMU's guest starved in the lab (2 cores)."""
    from benchmarks.memory_vs_qemu import QemuVm, _connect_qmp, initrd_with_virtio_pci
    from memvisor.guest.image import find_guest_image

    image = find_guest_image("default")
    assert image is not None, "no guest image: run `memvisor image build` first"
    initrd = initrd_with_virtio_pci(image, tmp_path / "initrd.img")
    start = time.monotonic()
    qemu = QemuVm(tmp_path, image.kernel, initrd, reporting=True, pmem=None)
    try:
        print(f"\n[manager] QEMU guest booted with its devices bound in {time.monotonic() - start:.0f} s")
        budget = 640 * MiB
        qemu_before = qemu.host_ram()
        log = tmp_path / "decisions.jsonl"
        sock = tmp_path / "qemu-qmp.sock"
        qemu.qmp.close()  # QEMU serves one client per -qmp socket: the manager's turn

        def qemu_actual() -> int | None:
            records = [r["vms"].get("qemu-qmp") for r in read_decisions(log)]
            return records[-1]["actual"] if records and records[-1] else None

        with running_manager([sock], budget, log, log.with_suffix(".stderr")) as proc:
            start = time.monotonic()
            wait_until(lambda: (qemu_actual() or 2 * budget) <= budget, timeout=240, interval=2,
                       what="the manager to bring the QEMU guest inside the budget")  # fmt: skip
            took = time.monotonic() - start
            time.sleep(4)
            qemu_after = qemu.host_ram()
        qemu.qmp = _connect_qmp(sock, qemu.process, 30)
        final = int(qemu.cmd("query-balloon")["actual"])
        assert proc.returncode == 0, log.with_suffix(".stderr").read_text()[-2000:]
        text = log.with_suffix(".stderr").read_text()
        print(f"[manager] QEMU guest at {final >> 20}M after {took:.0f} s (budget {budget >> 20}M); QEMU's RAM memfd held {qemu_before >> 20}M before, {qemu_after >> 20}M after")  # fmt: skip
        assert "qemu-qmp joined (qemu" in text, text[-2000:]
        assert "x-query-host-memory" not in [line for line in text.splitlines() if "qemu-qmp joined" in line][0]
        decisions = read_decisions(log)
        assert all(sum(vm["plan"] for vm in record["vms"].values()) <= budget for record in decisions)
        stats_seen = [r["vms"]["qemu-qmp"]["guest-available"] for r in decisions if "qemu-qmp" in r["vms"]]
        print(f"[manager] QEMU guest statistics seen in {sum(v is not None for v in stats_seen)} of {len(stats_seen)} rounds")
        assert any(v is not None for v in stats_seen), "the manager never saw QEMU's balloon statistics"
    finally:
        qemu.close()

