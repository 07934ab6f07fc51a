"""The deflate queue's per-page path (BalloonRam.pages, PageBitmap.clear_pages) agrees with the run-based one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from memvisor.devices.balloon.pages import BalloonRam, PageBitmap
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion

PAGE = 4096
# Two RAM regions with a hole between them (PFNs 16-31 and 48-63), like RAM below and above a gap.
LAYOUT = ((16 * PAGE, 16 * PAGE), (48 * PAGE, 16 * PAGE))


def balloon_ram() -> tuple[GuestMemory, BalloonRam]:
    memory = GuestMemory([MemoryRegion.anonymous(gpa, size, f"r{i}") for i, (gpa, size) in enumerate(LAYOUT)])
    return memory, BalloonRam(memory)


pfn_lists = st.lists(st.integers(-2, 80), max_size=60)


@given(pfn_lists, pfn_lists)
def test_pages_and_clear_pages_match_page_runs_and_clear_run(inflated: list[int], deflated: list[int]) -> None:
    memory, ram = balloon_ram()
    with memory:
        by_runs, by_pages = PageBitmap(ram.pfn_limit), PageBitmap(ram.pfn_limit)
        for first, count in ram.page_runs(inflated)[0]:
            by_runs.set_run(first, count)
            by_pages.set_run(first, count)
        runs, outside_runs = ram.page_runs(deflated)
        pages, outside_pages = ram.pages(deflated)
        assert outside_pages == outside_runs
        assert len(pages) == sum(count for _, count in runs)
        removed = sum(by_runs.clear_run(first, count) for first, count in runs)
        assert by_pages.clear_pages(pages) == removed
        assert by_pages.bits == by_runs.bits


def test_pages_outside_ram_are_counted_and_never_cleared() -> None:
    memory, ram = balloon_ram()
    with memory:
        pages, outside = ram.pages([16, 16, 31, 32, 47, 48, 63, 64, -1])
        assert pages == {16, 31, 48, 63} and outside == 4  # 32 and 47 are in the hole; 64 and -1 beyond RAM
        bitmap = PageBitmap(ram.pfn_limit)
        bitmap.set_run(0, ram.pfn_limit)
        assert bitmap.clear_pages([-1, 5, 5, 10**9]) == 1  # a duplicate clears once; out of range is ignored
        assert bitmap.count() == ram.pfn_limit - 1
