"""`--memory-backend`: parsing, the host checks that name their fix, and regions on huge pages.

A hugetlbfs memfd mapped MAP_NORESERVE needs no page of the host's pool until it is touched, so the regions here
are real hugetlbfs memory on any host with 2 MiB hugetlbfs support, reserved pages or not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memvisor.devices.mem import VirtioMemDevice
from memvisor.errors import UsageError
from memvisor.memory import libc
from memvisor.memory.backend import (
    HUGE_PAGE,
    HugePagePool,
    MemoryBackend,
    check_thp,
    hugepage_pool,
    hugepage_shortage_message,
    parse_memory_backend,
)
from memvisor.memory.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion
from memvisor.vmm.config import MachineConfig

MiB = 1 << 20
HUGETLB = MemoryBackend("hugetlb")
_no_hugetlb = pytest.mark.skipif(hugepage_pool() is None, reason="this kernel has no 2 MiB hugetlbfs pages")


def needs_hugetlb(test):  # type: ignore[no-untyped-def]
    """Skipped (allowed even in CI) on a kernel without 2 MiB hugetlbfs pages."""
    return pytest.mark.may_skip(_no_hugetlb(test))


@pytest.mark.parametrize(("text", "backend"), [
    ("4k", MemoryBackend("4k")),
    ("thp", MemoryBackend("thp")),
    ("hugetlb", MemoryBackend("hugetlb")),
    ("hugetlb,prealloc=on", MemoryBackend("hugetlb", prealloc=True)),
    ("thp,prealloc=off", MemoryBackend("thp")),
])  # fmt: skip
def test_backends_parse(text: str, backend: MemoryBackend) -> None:
    assert parse_memory_backend(text) == backend
    assert parse_memory_backend(backend.spec()) == backend


@pytest.mark.parametrize(("text", "words"), [
    ("2m", ("'2m' is not one of 4k, thp, hugetlb",)),
    ("hugetlb,size=1G", ("unknown option 'size'", "prealloc=on|off")),
    ("hugetlb,prealloc=yes", ("prealloc='yes' is not on or off",)),
])  # fmt: skip
def test_bad_backends_name_the_fix(text: str, words: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as error:
        parse_memory_backend(text)
    for word in words:
        assert word in str(error.value)


def test_page_sizes() -> None:
    assert MemoryBackend("4k").page_size == MemoryBackend("thp").page_size == 4096
    assert HUGETLB.page_size == HUGE_PAGE
    assert MemoryBackend("thp").alignment == HUGE_PAGE


@pytest.mark.parametrize("setting", ["never", "deny"])
def test_thp_off_for_shared_memory_is_refused_with_the_command_that_turns_it_on(tmp_path: Path, setting: str) -> None:
    control = tmp_path / "shmem_enabled"
    control.write_text(" ".join(f"[{s}]" if s == setting else s for s in
                                ("always", "within_size", "advise", "never", "deny", "force")) + "\n")
    with pytest.raises(UsageError) as error:
        check_thp(control)
    assert f"is [{setting}]); as root: echo advise > {control}" in str(error.value)
    control.write_text("always within_size [advise] never deny force\n")
    check_thp(control)
    with pytest.raises(UsageError, match="no transparent huge pages"):
        check_thp(tmp_path / "missing")


def test_the_shortage_message_names_the_pages_needed_and_the_total_to_reserve() -> None:
    message = hugepage_shortage_message(1 << 30, "guest RAM 'ram0'", HugePagePool(total=100, free=60, reserved=10))
    assert "needs 512 free 2 MiB huge pages and the host has 50" in message
    assert "echo 562 > /" in message and "nr_hugepages" in message  # 100 in the pool + the 462 missing


@needs_hugetlb
def test_a_hugetlb_region_gives_memory_back_only_in_whole_2m_pages() -> None:
    region = MemoryRegion.memfd(0, 8 * MiB, "ram", HUGETLB, reserve=False)
    with GuestMemory([region]) as memory:
        assert region.page_size == HUGE_PAGE and region.host_addr % HUGE_PAGE == 0
        with pytest.raises(GuestMemoryError, match="not aligned to the 2097152-byte host pages of region 'ram'"):
            memory.discard(4096, 4096)
        with pytest.raises(GuestMemoryError, match="2097152-byte host pages"):
            memory.discard(0, 3 * MiB)
        memory.discard(2 * MiB, 4 * MiB)  # nothing allocated yet: a no-op, but accepted
        assert memory.allocated_bytes() == 0


@needs_hugetlb
def test_hugetlb_regions_are_2m_aligned_in_guest_memory() -> None:
    with pytest.raises(Exception, match="is not a positive multiple of 2097152"):
        MemoryRegion.memfd(0, 3 * MiB, "ram", HUGETLB, reserve=False)
    with pytest.raises(Exception, match="not aligned to 2097152"):
        MemoryRegion.memfd(1 * MiB, 4 * MiB, "ram", HUGETLB, reserve=False)


@needs_hugetlb
def test_reserved_hugetlb_ram_beyond_the_pool_is_refused_naming_nr_hugepages() -> None:
    pool = hugepage_pool()
    assert pool is not None
    size = (pool.available + 1) * HUGE_PAGE
    with pytest.raises(UsageError) as error:
        MemoryRegion.memfd(0, size, "ram0", HUGETLB)
    assert f"needs {pool.available + 1} free 2 MiB huge pages" in str(error.value)
    assert "nr_hugepages" in str(error.value)


def test_mmap_aligned_gives_an_aligned_mapping_and_leaves_nothing_around_it() -> None:
    region = MemoryRegion.memfd(0, 4 * MiB, "ram")
    try:
        addr = libc.mmap_aligned(4 * MiB, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, region.fd or 0, HUGE_PAGE)
        assert addr % HUGE_PAGE == 0
        maps = Path("/proc/self/maps").read_text()
        assert f"{addr:x}-{addr + 4 * MiB:x} rw-s" in maps
        assert f"-{addr:x} ---p" not in maps  # the PROT_NONE reservation before it is gone
        libc.munmap(addr, 4 * MiB)
    finally:
        region.close()


def test_virtio_mem_refuses_a_block_smaller_than_the_host_page() -> None:
    region = MemoryRegion.memfd(1 << 32, 128 * MiB, "mem-vm0")
    region.page_size = 4 * MiB  # a host whose pages are bigger than the 2 MiB blocks
    try:
        with pytest.raises(UsageError, match="block size 2M is smaller than the 4M host pages .* block-size=4M"):
            VirtioMemDevice(region, block_size=2 * MiB)
        VirtioMemDevice(region, block_size=4 * MiB)
    finally:
        region.close()


def test_hugetlb_memory_is_not_measured_against_mem_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reserved hugetlbfs pages are outside MemAvailable: the pool is checked when the RAM is mapped instead."""
    monkeypatch.setattr("memvisor.vmm.config.host_memory_available", lambda: 256 * MiB)
    config = MachineConfig(memory=1 << 30, vcpus=1, kernel=Path("/"), initrd=None)
    with pytest.raises(UsageError, match="more than the host can give"):
        config.validate_resources()
    config.memory_backend = HUGETLB
    config.validate_resources()


def test_a_process_holding_hugetlbfs_pages_is_measured_with_them(tmp_path: Path) -> None:
    """The manager measures a QEMU VM by /proc/PID/status: its hugetlbfs RAM is in HugetlbPages, not VmRSS."""
    from memvisor.manager.host import process_rss

    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text("Name:\tqemu\nVmRSS:\t  51200 kB\nRssShmem:\t 0 kB\nHugetlbPages:\t 1048576 kB\n")
    assert process_rss(42, tmp_path) == (50 + 1024) * MiB
    (tmp_path / "42" / "status").write_text("Name:\tqemu\nVmRSS:\t  51200 kB\n")
    assert process_rss(42, tmp_path) == 50 * MiB
