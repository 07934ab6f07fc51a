"""Issue 11: guest RAM on huge pages (`--memory-backend thp` and `hugetlb`) with a real Linux guest.

One guest per backing, with a balloon that offers free page reporting, runs both scenarios:
- balloon: the guest fills and frees 600 MiB while its free page reporting is held off (the
  page_reporting_order module parameter set past the largest order, so nothing is reported), then the balloon
  inflates 1 GiB -> 512 MiB: the host must get about that much back (the guest reuses the pages it freed
  last first, so the balloon's pages are mostly ones the host backs). On hugetlbfs memory goes back only in
  whole 2 MiB pages (a host page is discarded once all 512 of its 4 KiB guest pages are in the balloon), so
  the bound there is looser, and the pool's free count must rise. A file of random bytes survives inflate
  and deflate;
- free page reporting, switched back on: 400 MiB written and freed come back to the host without a command.

The host side is set up by the test and put back afterwards (this needs root, as inside the lab): THP for
shared memory (`shmem_enabled` = advise) and 2 MiB hugetlbfs pages for the guest's RAM (`nr_hugepages`).
Host memory is read from outside memvisor as in test_balloon.py (the st_blocks of its memfds, which count
hugetlbfs pages too) and compared with memvisor's own x-query-host-memory and with /proc/PID/smaps_rollup.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.memory.backend import HUGEPAGES_2M, THP_SHMEM_CONTROL, hugepage_pool, thp_shmem_setting
from tests.guest.balloon_wait import balloon_actual, move_balloon
from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20
RAM = 1024 * MiB
TMPFS = "/mnt/huge-test"
# Past the largest page order (10 on x86-64 Debian 6.1): the guest reports nothing until it is set back.
REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
NO_REPORTING = 11
# Guest RAM in 2 MiB pages, and a margin for the virtio-console and rings (none: all in RAM) and rounding.
HUGE_PAGES_NEEDED = RAM // (2 * MiB) + 8

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def host_huge_pages() -> Iterator[None]:
    """THP for shared memory and enough reserved 2 MiB pages, put back as they were afterwards."""
    shmem = thp_shmem_setting()
    nr = HUGEPAGES_2M / "nr_hugepages"
    pool = hugepage_pool()
    assert shmem is not None and pool is not None, "this host has no transparent or hugetlbfs huge pages"
    try:
        THP_SHMEM_CONTROL.write_text("advise")
        nr.write_text(str(pool.total + max(HUGE_PAGES_NEEDED - pool.available, 0)))
        now = hugepage_pool()
        assert now is not None and now.available >= HUGE_PAGES_NEEDED, f"could not reserve huge pages: {now}"
        yield
    finally:
        THP_SHMEM_CONTROL.write_text(shmem)
        nr.write_text(str(pool.total))


def _smaps(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        if len(words) == 2 and words[1] == "kB":
            values[name] = int(words[0]) * 1024
    return values


def _host_meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * (1024 if rest.strip().endswith("kB") else 1)
    return values


def _checksum(vm: GuestVM, path: str) -> str:
    return vm.check(f"sha256sum {path}").split()[0]


def _write(vm: GuestVM, name: str, mib: int) -> None:
    vm.check(f"dd if=/dev/zero of={TMPFS}/{name} bs=1M count={mib} 2>/dev/null", timeout=600)


@pytest.mark.parametrize("backend", ["thp", "hugetlb"])
@pytest.mark.timeout(900)
def test_balloon_and_free_page_reporting_give_huge_page_memory_back(
    tmp_path: Path, host_huge_pages: None, backend: str
) -> None:
    start = time.monotonic()
    with GuestVM(tmp_path, memory="1G", extra=["--memory-backend", backend],
                 devices=["virtio-balloon,id=balloon0,free-page-reporting=on"]) as vm:  # fmt: skip
        print(f"\n[huge] {backend}: booted in {time.monotonic() - start:.1f} s")
        vm.check(f"mkdir -p {TMPFS} && mount -t tmpfs -o size=100% tmpfs {TMPFS}")
        order = vm.check(f"cat {REPORTING_ORDER}").strip()
        vm.check(f"echo {NO_REPORTING} > {REPORTING_ORDER}")

        # The guest's RAM is really on huge pages, and memvisor measures it as the host does.
        vm.check(f"dd if=/dev/urandom of={TMPFS}/keep bs=1M count=32 2>/dev/null")
        kept = _checksum(vm, f"{TMPFS}/keep")
        _write(vm, "f", 600)
        held = vm.host_memory()
        smaps = _smaps(vm.process.pid)
        own = int(vm.cmd("x-query-host-memory")["total"])
        print(f"[huge] {backend}: after 632 MiB written the host holds {held // MiB} MiB (memvisor says "
              f"{own // MiB} MiB); smaps: ShmemPmdMapped {smaps.get('ShmemPmdMapped', 0) // MiB} MiB, "
              f"hugetlb {(smaps.get('Private_Hugetlb', 0) + smaps.get('Shared_Hugetlb', 0)) // MiB} MiB, "
              f"Rss {smaps.get('Rss', 0) // MiB} MiB")  # fmt: skip
        assert held >= 632 * MiB, f"after the guest wrote 632 MiB the host holds only {held // MiB} MiB"
        assert abs(own - held) <= 8 * MiB, f"memvisor measures {own // MiB} MiB, the memfds hold {held // MiB} MiB"
        if backend == "hugetlb":
            hugetlb = smaps.get("Private_Hugetlb", 0) + smaps.get("Shared_Hugetlb", 0)
            assert hugetlb >= 632 * MiB, f"only {hugetlb // MiB} MiB of hugetlbfs pages are mapped"
            assert abs(hugetlb - held) <= 8 * MiB, f"smaps: {hugetlb // MiB} MiB hugetlb, memfds {held // MiB} MiB"
        else:  # nothing else in the lab uses transparent huge pages of shared memory
            shmem_huge = _host_meminfo()["ShmemHugePages"]
            print(f"[huge] thp: the host's ShmemHugePages is {shmem_huge // MiB} MiB")
            assert shmem_huge >= 256 * MiB, f"guest RAM is not on transparent huge pages: {shmem_huge // MiB} MiB"

        # Balloon: 600 MiB freed in the guest (not reported), then 512 MiB inflated.
        vm.check(f"rm {TMPFS}/f")
        time.sleep(3)  # past the guest's 2 s reporting delay: shows that nothing is reported meanwhile
        before = vm.host_memory()
        assert before >= held - 16 * MiB, f"the host got memory back with reporting off: {held // MiB} -> {before // MiB}"
        pool_before = hugepage_pool()
        move_balloon(vm, 512 * MiB, f"{backend}: inflate 1G -> 512M")
        ballooned = RAM - balloon_actual(vm)
        after = vm.host_memory()
        pool_after = hugepage_pool()
        print(f"[huge] {backend}: balloon {ballooned // MiB} MiB, host memory {before // MiB} -> {after // MiB} MiB, "
              f"pool free {pool_before} -> {pool_after}")  # fmt: skip
        share = 0.6 if backend == "hugetlb" else 0.9
        assert before - after >= share * ballooned, (
            f"the guest gave up {ballooned // MiB} MiB but the host holds only {(before - after) // MiB} MiB less")
        if backend == "hugetlb":
            assert pool_before is not None and pool_after is not None
            assert (pool_after.free - pool_before.free) * 2 * MiB >= share * ballooned, (pool_before, pool_after)
        assert _checksum(vm, f"{TMPFS}/keep") == kept, "the guest's file changed while the balloon was inflated"
        move_balloon(vm, RAM, f"{backend}: deflate 512M -> 1G")
        assert _checksum(vm, f"{TMPFS}/keep") == kept, "the guest's file changed across inflate and deflate"
        vm.check(f"dd if=/dev/urandom of={TMPFS}/more bs=1M count=32 2>/dev/null && sha256sum {TMPFS}/more")

        # Free page reporting, on again: what the guest frees comes back to the host.
        vm.check(f"echo {order} > {REPORTING_ORDER}")
        _write(vm, "f", 400)
        peak = vm.host_memory()
        vm.check(f"rm {TMPFS}/f {TMPFS}/more")
        start = time.monotonic()
        wait_until(lambda: peak - vm.host_memory() >= 300 * MiB, timeout=180, interval=0.5,
                   what=f"{backend}: the host to get 300 MiB back by free page reporting")  # fmt: skip
        print(f"[huge] {backend}: free page reporting: host memory {peak // MiB} -> {vm.host_memory() // MiB} MiB "
              f"within {time.monotonic() - start:.1f} s")  # fmt: skip
        assert _checksum(vm, f"{TMPFS}/keep") == kept
