"""The balloon and virtio-mem / pmem memory (issue 12 item 3).

Linux allocates balloon pages as movable, largely from the ZONE_MOVABLE memory virtio-mem onlines: pages in
plugged blocks are discarded and tracked; pages in unplugged blocks are ignored and counted; a pmem file is
never a balloon target (inflating one would punch a hole in the user's file).
"""

from __future__ import annotations

from pathlib import Path

from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.testing import TOTAL_RAM, BalloonDriver, balloon_memory
from memvisor.devices.mem import VirtioMemDevice
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion

MiB = 1 << 20
BLOCK = 2 * MiB
VMEM_GPA = 1 << 32
VMEM_PFN = VMEM_GPA >> 12
PMEM_GPA = 1 << 31
PMEM_PFN = PMEM_GPA >> 12


def _setup(tmp_path: Path) -> tuple[GuestMemory, VirtioMemDevice, BalloonDevice, BalloonDriver, Path]:
    memory = balloon_memory()
    region = MemoryRegion.memfd(VMEM_GPA, 128 * MiB, "mem-vm0")
    memory.add(region)
    mem = VirtioMemDevice(region, block_size=BLOCK, requested_size=64 * MiB)
    mem._plug(VMEM_GPA, 4 * BLOCK)  # what a PLUG request does: blocks 0-3 become usable
    mem._bitmap.set_range(0, 4, True)
    pmem_file = tmp_path / "pmem.img"
    pmem_file.write_bytes(b"\x5a" * (4 * MiB))
    memory.add(MemoryRegion.file(PMEM_GPA, pmem_file, 4 * MiB, name="pmem-pm0"))
    balloon = BalloonDevice(TOTAL_RAM, free_page_reporting=True)
    return memory, mem, balloon, BalloonDriver(balloon, memory), pmem_file


def test_inflating_plugged_virtio_mem_pages_gives_them_back(tmp_path: Path) -> None:
    memory, mem, balloon, driver, _ = _setup(tmp_path)
    region = memory.region_at(VMEM_GPA)
    memory.write(VMEM_GPA, b"\xaa" * (4 * BLOCK))  # the guest used the plugged memory
    assert memory.allocated_bytes(region) == 4 * BLOCK
    driver.inflate(range(VMEM_PFN, VMEM_PFN + 256))
    assert memory.allocated_bytes(region) == 4 * BLOCK - 256 * 4096
    assert balloon.counters["pages_inflated"] == 256 and balloon.counters["errors"] == 0
    assert balloon.inflated_pages() == 256  # tracked, so a deflate stays correct
    driver.deflate(range(VMEM_PFN, VMEM_PFN + 256))
    assert balloon.inflated_pages() == 0
    assert not driver.broken


def test_pages_in_unplugged_blocks_are_ignored_and_counted(tmp_path: Path) -> None:
    memory, mem, balloon, driver, _ = _setup(tmp_path)
    first_unplugged = VMEM_PFN + 4 * BLOCK // 4096
    driver.inflate(range(first_unplugged - 16, first_unplugged + 16))  # half plugged, half not
    assert balloon.counters["pages_inflated"] == 16
    assert balloon.counters["pages_ignored"] == 16
    assert balloon.inflated_pages() == 16
    errors = balloon.counters["errors"]
    driver.report([(VMEM_GPA + 4 * BLOCK, BLOCK)])  # a buffer in an unplugged block: refused like one outside RAM
    assert balloon.counters["errors"] == errors + 1 and balloon.counters["pages_reported"] == 0
    assert memory.allocated_bytes(memory.region_at(VMEM_GPA)) == 0
    assert not driver.broken


def test_pmem_is_never_a_balloon_target(tmp_path: Path) -> None:
    memory, _, balloon, driver, pmem_file = _setup(tmp_path)
    driver.inflate(range(PMEM_PFN, PMEM_PFN + 256))
    driver.report([(PMEM_GPA, 2 * MiB)])
    assert pmem_file.read_bytes() == b"\x5a" * (4 * MiB)
    assert memory.allocated_bytes(memory.region_at(PMEM_GPA)) == 4 * MiB
    assert balloon.counters["bytes_discarded"] == 0
    assert balloon.counters["errors"] > 0  # counted as PFNs outside the balloon's RAM
    assert not driver.broken


def test_a_host_discard_failure_is_not_blamed_on_the_guest(tmp_path: Path) -> None:
    memory, _, balloon, driver, _ = _setup(tmp_path)
    region = memory.region_at(VMEM_GPA)

    def refuse(offset: int, length: int, who: str = "discard") -> None:
        raise OSError(5, "Input/output error")

    region.discard = refuse  # type: ignore[method-assign]
    driver.inflate(range(VMEM_PFN, VMEM_PFN + 8))
    assert balloon.counters["discard_failures"] == 1
    assert balloon.counters["errors"] == 0
