"""MEMVISOR_DISCARD_LOG: every host discard of guest memory (and every virtio-mem protect) lands in the log with the
path that asked for it and the right guest physical range, through each path that discards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.testing import RAM_GPA, RAM_PFN, TOTAL_RAM, BalloonDriver, MiB, balloon_memory
from memvisor.devices.mem import VirtioMemDevice
from memvisor.devices.mem.protocol import (
    RESPONSE,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    MemRequest,
)
from memvisor.memory import discard_log
from memvisor.memory.guest_memory import DiscardError, GuestMemory, MemoryRegion
from memvisor.migration import stream
from memvisor.migration.incoming import Receiver
from memvisor.virtio.testing import attach, test_memory

BLOCK = 2 * MiB
VMEM_GPA = 1 << 32
VMEM_PFN = VMEM_GPA >> 12
LINE = re.compile(r"^(\d+) (\S+) (\S+) gpa=(0x[0-9a-f]+)-(0x[0-9a-f]+) len=(0x[0-9a-f]+) region=(\S+) "
                  r"offset=(0x[0-9a-f]+)( failed: .*)?$")  # fmt: skip


@pytest.fixture
def log_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "discards.log"
    previous = discard_log.active
    discard_log.install(str(path))
    yield path
    discard_log.uninstall()
    discard_log.active = previous


def entries(path: Path) -> list[tuple[str, str, int, int, str, int]]:
    """(who, op, first gpa, end gpa, region, offset) of each line, checking every line's shape."""
    found = []
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        assert match is not None, f"malformed discard log line: {line!r}"
        _, who, op, first, end, length, region, offset, _ = match.groups()
        assert int(end, 16) - int(first, 16) == int(length, 16)
        found.append((who, op, int(first, 16), int(end, 16), region, int(offset, 16)))
    return found


def test_off_by_default_and_a_discard_writes_nothing(tmp_path: Path) -> None:
    assert discard_log.active is None  # the test run does not set MEMVISOR_DISCARD_LOG
    with GuestMemory([MemoryRegion.memfd(0, 4 * MiB, "ram")]) as memory:
        memory.write(0x1000, b"x")
        memory.discard(0x1000, 0x1000, "balloon-inflate")
        assert memory.read(0x1000, 1) == b"\0"
    assert list(tmp_path.iterdir()) == []


def test_a_memfd_punch_and_a_private_dontneed_carry_the_gpa_region_and_offset(log_path: Path) -> None:
    before = time.monotonic_ns()
    with GuestMemory([MemoryRegion.memfd(0, 4 * MiB, "ram0"), MemoryRegion.anonymous(8 * MiB, 4 * MiB, "anon")]) as m:
        m.discard(0x3000, 0x2000, "balloon-inflate")
        m.discard(8 * MiB + 0x10000, 0x1000)
    assert entries(log_path) == [
        ("balloon-inflate", "punch", 0x3000, 0x5000, "ram0", 0x3000),
        ("discard", "dontneed", 8 * MiB + 0x10000, 8 * MiB + 0x11000, "anon", 0x10000),
    ]
    stamp = int(log_path.read_text().split()[0])
    assert before <= stamp <= time.monotonic_ns()


def test_a_failed_discard_is_logged_as_failed(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memvisor.memory import libc

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(libc, "fallocate", refuse)
    with GuestMemory([MemoryRegion.memfd(0, 4 * MiB, "ram0")]) as memory, pytest.raises(DiscardError):
        memory.discard(0x1000, 0x1000, "balloon-report")
    assert log_path.read_text().rstrip().endswith("failed: Input/output error")
    assert entries(log_path) == [("balloon-report", "punch", 0x1000, 0x2000, "ram0", 0x1000)]


def test_balloon_inflate_and_reporting_name_their_paths(log_path: Path) -> None:
    memory = balloon_memory()
    try:
        device = BalloonDevice(TOTAL_RAM, free_page_reporting=True)
        driver = BalloonDriver(device, memory)
        driver.inflate([RAM_PFN + 7, RAM_PFN + 8, RAM_PFN + 300])
        driver.deflate([RAM_PFN + 7])  # a deflate discards nothing: logged as the pages' return to the guest
        driver.report([(RAM_GPA + 4 * MiB, 2 * MiB)])
        region = memory.region_at(RAM_GPA)
        base = RAM_GPA - region.gpa
        assert entries(log_path) == [
            ("balloon-inflate", "punch", RAM_GPA + 7 * 4096, RAM_GPA + 9 * 4096, region.name, base + 7 * 4096),
            ("balloon-inflate", "punch", RAM_GPA + 300 * 4096, RAM_GPA + 301 * 4096, region.name, base + 300 * 4096),
            ("balloon-deflate", "give-back", RAM_GPA + 7 * 4096, RAM_GPA + 8 * 4096, region.name, base + 7 * 4096),
            ("balloon-report", "punch", RAM_GPA + 4 * MiB, RAM_GPA + 6 * MiB, region.name, base + 4 * MiB),
        ]
    finally:
        memory.close()


def test_balloon_pages_inside_virtio_mem_are_logged_at_their_gpa(log_path: Path) -> None:
    memory = balloon_memory()
    region = MemoryRegion.memfd(VMEM_GPA, 64 * MiB, "mem-vm0")
    memory.add(region)
    try:
        mem = VirtioMemDevice(region, block_size=BLOCK, requested_size=8 * MiB)
        mem._plug(VMEM_GPA + BLOCK, BLOCK)  # what a PLUG request of block 1 does
        mem._bitmap.set_range(1, 1, True)
        driver = BalloonDriver(BalloonDevice(TOTAL_RAM), memory)
        driver.inflate([VMEM_PFN + 512 + 3, VMEM_PFN + 5])  # block 1's fourth page; block 0 is unplugged: ignored
        assert entries(log_path)[-1] == ("balloon-inflate", "punch", VMEM_GPA + BLOCK + 0x3000,
                                         VMEM_GPA + BLOCK + 0x4000, "mem-vm0", BLOCK + 0x3000)  # fmt: skip
        assert [e[:2] for e in entries(log_path)] == [("mem-init", "prot-none"), ("mem-plug", "prot-rw"),
                                                      ("balloon-inflate", "punch")]  # fmt: skip
    finally:
        memory.close()


class MemSetup:
    def __init__(self) -> None:
        self.memory = test_memory()
        self.region = MemoryRegion.memfd(VMEM_GPA, 64 * MiB, "mem-vm0")
        self.memory.add(self.region)
        self.device = VirtioMemDevice(self.region, block_size=BLOCK, requested_size=16 * MiB)
        self.queue = attach(self.device, self.memory).queues[0]

    def request(self, kind: int, addr: int = VMEM_GPA, blocks: int = 1) -> int:
        head = self.queue.add_buffer([MemRequest(kind, addr, blocks).encode()], [RESPONSE.size])
        self.queue.kick()
        (used,) = self.queue.get_used()
        assert used[0] == head
        return int(RESPONSE.unpack(used[2])[0])


def test_virtio_mem_plug_unplug_unplug_all_and_reset_name_their_paths(log_path: Path) -> None:
    s = MemSetup()
    try:
        assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 2 * BLOCK, 3) == VIRTIO_MEM_RESP_ACK
        assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA + 3 * BLOCK, 1) == VIRTIO_MEM_RESP_ACK
        assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL) == VIRTIO_MEM_RESP_ACK
        assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1) == VIRTIO_MEM_RESP_ACK
        s.device.system_reset()
        g = VMEM_GPA
        assert entries(log_path) == [
            ("mem-init", "prot-none", g, g + 64 * MiB, "mem-vm0", 0),
            ("mem-plug", "prot-rw", g + 2 * BLOCK, g + 5 * BLOCK, "mem-vm0", 2 * BLOCK),
            ("mem-unplug", "prot-none", g + 3 * BLOCK, g + 4 * BLOCK, "mem-vm0", 3 * BLOCK),
            ("mem-unplug", "punch", g + 3 * BLOCK, g + 4 * BLOCK, "mem-vm0", 3 * BLOCK),
            ("mem-unplug-all", "prot-none", g + 2 * BLOCK, g + 3 * BLOCK, "mem-vm0", 2 * BLOCK),
            ("mem-unplug-all", "punch", g + 2 * BLOCK, g + 3 * BLOCK, "mem-vm0", 2 * BLOCK),
            ("mem-unplug-all", "prot-none", g + 4 * BLOCK, g + 5 * BLOCK, "mem-vm0", 4 * BLOCK),
            ("mem-unplug-all", "punch", g + 4 * BLOCK, g + 5 * BLOCK, "mem-vm0", 4 * BLOCK),
            ("mem-unplug-all-region", "punch", g, g + 64 * MiB, "mem-vm0", 0),
            ("mem-plug", "prot-rw", g, g + BLOCK, "mem-vm0", 0),
            ("mem-reset", "prot-none", g, g + BLOCK, "mem-vm0", 0),
            ("mem-reset", "punch", g, g + BLOCK, "mem-vm0", 0),
            ("mem-reset-region", "punch", g, g + 64 * MiB, "mem-vm0", 0),
        ]
    finally:
        s.memory.close()


def test_virtio_mem_plug_rollback_is_logged(log_path: Path) -> None:
    s = MemSetup()

    def refuse(gpa: int, size: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    s.device.on_plug = refuse
    try:
        assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + BLOCK, 1) != VIRTIO_MEM_RESP_ACK
        assert [e[:3] for e in entries(log_path)[1:]] == [
            ("mem-plug", "prot-rw", VMEM_GPA + BLOCK),
            ("mem-plug-rollback", "prot-none", VMEM_GPA + BLOCK),
            ("mem-plug-rollback", "punch", VMEM_GPA + BLOCK),
        ]
    finally:
        s.memory.close()


def test_a_migration_zero_record_is_logged(log_path: Path) -> None:
    region = MemoryRegion.memfd(1 << 30, 4 * MiB, "ram1")
    try:
        receiver = Receiver.__new__(Receiver)
        receiver.regions = [region]
        record = stream.Record(stream.ZERO, memoryview(stream.zero_record((1 << 30) + 0x5000, 3))[8:])
        receiver.pages(record)
        assert entries(log_path) == [("migration-zero", "punch", (1 << 30) + 0x5000, (1 << 30) + 0x8000, "ram1", 0x5000)]
    finally:
        region.close()


def test_the_environment_turns_it_on_and_a_bad_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    code = ("from memvisor.memory.guest_memory import GuestMemory, MemoryRegion\n"
            "m = GuestMemory([MemoryRegion.memfd(0, 1 << 21, 'ram0')])\nm.discard(0x2000, 0x1000, 'balloon-inflate')\n")  # fmt: skip
    env = dict(os.environ, MEMVISOR_DISCARD_LOG=str(path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).resolve().parents[2])
    assert entries(path) == [("balloon-inflate", "punch", 0x2000, 0x3000, "ram0", 0x2000)]
    env["MEMVISOR_DISCARD_LOG"] = str(tmp_path / "no" / "such" / "dir" / "d.log")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0  # the VMM runs on without the log
    assert "MEMVISOR_DISCARD_LOG=" in done.stderr and "cannot open it" in done.stderr
