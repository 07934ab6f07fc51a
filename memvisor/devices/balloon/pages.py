"""Guest RAM as the balloon sees it: which 4 KiB pages it may discard, and bitmaps of pages.

The balloon names memory in 4 KiB page frame numbers (PFNs) or in guest physical ranges, both chosen by the
guest, so both are hostile. `BalloonRam` keeps the regions the balloon may act on (writable guest RAM; a
read-only pmem file or a region the VMM excludes is never discarded), turns a batch of PFNs into sorted
runs of contiguous pages inside one region (one hole punch per run instead of one per page), and clips a
range inward to whole pages inside one region. `PageBitmap` is a numpy bitmap of PFNs over that RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from memvisor.devices.balloon.constants import BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE

if TYPE_CHECKING:
    from memvisor.memory.guest_memory import GuestMemory, MemoryRegion

RegionFilter = Callable[["MemoryRegion"], bool]


def writable_region(region: MemoryRegion) -> bool:
    """The default region filter: any region that is not read-only."""
    return not region.readonly


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    """Coalesce sorted, unique PFNs into (first PFN, page count) runs of contiguous pages."""
    if pfns.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pfns.size]))
    return [(int(pfns[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class BalloonRam:
    """The page-aligned spans of guest memory the balloon may act on, as PFN ranges [first, end)."""

    def __init__(self, memory: GuestMemory, region_filter: RegionFilter = writable_region):
        self.spans: list[tuple[int, int]] = []
        for region in memory.regions:
            if not region_filter(region):
                continue
            first = -(-region.gpa // BALLOON_PAGE_SIZE)
            end = (region.gpa + region.size) // BALLOON_PAGE_SIZE
            if end > first:
                self.spans.append((first, end))
        self.spans.sort()
        self.pfn_limit = max((end for _, end in self.spans), default=0)

    def page_runs(self, pfns: Iterable[int] | np.ndarray) -> tuple[list[tuple[int, int]], int]:
        """Split guest PFNs into runs inside the balloon's RAM and a count of PFNs outside it.

        Duplicates collapse into one page; the runs never cross a region boundary.
        """
        array = np.unique(np.asarray(pfns, dtype=np.int64))
        inside = np.zeros(array.size, dtype=bool)
        for first, end in self.spans:
            inside |= (array >= first) & (array < end)
        valid = array[inside]
        result: list[tuple[int, int]] = []
        for first, end in self.spans:
            part = valid[(valid >= first) & (valid < end)]
            result += runs(part)
        return result, int(array.size - valid.size)

    def clip(self, gpa: int, length: int) -> tuple[int, int] | None:
        """The whole 4 KiB pages of [gpa, gpa+length) as (first PFN, count), if inside one span; else None."""
        if gpa < 0 or length <= 0:
            return None
        first = -(-gpa // BALLOON_PAGE_SIZE)
        end = (gpa + length) >> BALLOON_PAGE_SHIFT
        if end <= first:
            return None
        for span_first, span_end in self.spans:
            if span_first <= first and end <= span_end:
                return first, end - first
        return None


class PageBitmap:
    """One bit (a numpy bool) per 4 KiB guest page, PFN 0 up to `size`."""

    def __init__(self, size: int):
        self.bits = np.zeros(size, dtype=bool)

    @property
    def size(self) -> int:
        return int(self.bits.size)

    def count(self) -> int:
        return int(np.count_nonzero(self.bits))

    def set_run(self, first: int, count: int) -> int:
        """Set [first, first+count); return how many bits were newly set."""
        window = self.bits[first:first + count]
        added = int(window.size - np.count_nonzero(window))
        window[:] = True
        return added

    def clear_run(self, first: int, count: int) -> int:
        """Clear [first, first+count); return how many bits were set before."""
        window = self.bits[first:first + count]
        removed = int(np.count_nonzero(window))
        window[:] = False
        return removed

    def clear_mask(self, mask: np.ndarray) -> int:
        """Clear every bit set in the boolean array `mask` (indexed by PFN); return how many were set."""
        mask = np.asarray(mask, dtype=bool)[: self.size]
        window = self.bits[: mask.size]
        removed = int(np.count_nonzero(window & mask))
        window &= ~mask
        return removed

    def ranges(self) -> Iterator[tuple[int, int]]:
        """The set bits as (first PFN, count) runs, in order."""
        yield from runs(np.flatnonzero(self.bits))

    def clear(self) -> None:
        self.bits[:] = False
