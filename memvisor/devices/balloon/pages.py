"""Guest RAM as the balloon sees it: which 4 KiB pages it may discard, and bitmaps of pages.

The balloon names memory in 4 KiB page frame numbers (PFNs) or in guest physical ranges, both chosen by the
guest, so both are hostile. `BalloonRam` keeps the regions the balloon may act on (writable guest RAM,
including virtio-mem regions, whose unplugged blocks `GuestMemory` refuses; a pmem file, read-only memory or a
region the VMM excludes is never discarded), turns a batch of PFNs into sorted
runs of contiguous pages inside one region (one hole punch per run instead of one per page), and clips a
range inward to whole pages inside one region. `PageBitmap` is one byte per PFN over that RAM. On RAM backed
by bigger host pages (hugetlbfs 2 MiB) only whole host pages are given back (`BalloonRam.whole_host_pages`).

Nothing here imports numpy at start-up (it costs seconds of Python start-up in the lab): a buffer holds at
most 256 PFNs, and bytearray's own `count` and `find` do the bitmap work at C speed. Only the migration
path, whose dirty masks are numpy arrays already, imports numpy, inside `PageBitmap.clear_mask`/`to_array`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from memvisor.devices.balloon.constants import BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np

    from memvisor.memory.guest_memory import GuestMemory, MemoryRegion

RegionFilter = Callable[["MemoryRegion"], bool]


def writable_region(region: MemoryRegion) -> bool:
    """The default region filter: writable RAM (boot RAM, virtio-mem), never a file (pmem) or read-only memory."""
    return not region.readonly and region.balloon_target


def runs(pfns: Sequence[int]) -> list[tuple[int, int]]:
    """Coalesce sorted, unique PFNs into (first PFN, page count) runs of contiguous pages."""
    result: list[tuple[int, int]] = []
    for pfn in pfns:
        if result and result[-1][0] + result[-1][1] == pfn:
            result[-1] = (result[-1][0], result[-1][1] + 1)
        else:
            result.append((pfn, 1))
    return result


class BalloonRam:
    """The page-aligned spans of guest memory the balloon may act on, as PFN ranges [first, end).

    `host_pages[i]` is how many 4 KiB guest pages make one host page of span i (512 on hugetlbfs 2 MiB pages,
    else 1): memory goes back to the host only in whole host pages (`whole_host_pages`, `inward`). A region on
    bigger host pages is aligned to them (MemoryRegion.memfd checks), so host pages start at multiples of it.
    """

    def __init__(self, memory: GuestMemory, region_filter: RegionFilter = writable_region):
        spans: list[tuple[int, int, int]] = []
        for region in memory.regions:
            if not region_filter(region):
                continue
            first = -(-region.gpa // BALLOON_PAGE_SIZE)
            end = (region.gpa + region.size) // BALLOON_PAGE_SIZE
            if end > first:
                spans.append((first, end, max(region.page_size // BALLOON_PAGE_SIZE, 1)))
        spans.sort()
        self.spans: list[tuple[int, int]] = [(first, end) for first, end, _ in spans]
        self.host_pages: list[int] = [pages for _, _, pages in spans]
        self.pfn_limit = max((end for _, end in self.spans), default=0)

    def host_page_pages(self, pfn: int) -> int:
        """How many 4 KiB pages make the host page holding `pfn` (1 outside the balloon's RAM)."""
        for (first, end), pages in zip(self.spans, self.host_pages, strict=True):
            if first <= pfn < end:
                return pages
        return 1

    def whole_host_pages(self, page_runs: Iterable[tuple[int, int]], held: PageBitmap) -> list[tuple[int, int]]:
        """The host pages that hold a page of `page_runs` and whose every 4 KiB page is set in `held`, as runs.

        On 4 KiB host pages that is `page_runs` itself; on 2 MiB pages a host page is given back only once all 512
        of its guest pages are in the balloon, so nothing the guest still uses is freed (QEMU keeps a tracker of
        partially ballooned pages for this; the balloon's bitmap of inflated pages is that tracker, exact for
        any order of inflates and deflates)."""
        result: list[tuple[int, int]] = []
        for first, count in page_runs:
            pages = self.host_page_pages(first)
            if pages == 1:
                result.append((first, count))
                continue
            bits = held.bits
            for page in range(first - first % pages, first + count, pages):
                if bits.count(1, page, page + pages) != pages:
                    continue
                if result and result[-1][0] + result[-1][1] == page:
                    result[-1] = (result[-1][0], result[-1][1] + pages)
                else:
                    result.append((page, pages))
        return result

    def inward(self, first: int, count: int) -> tuple[int, int] | None:
        """The whole host pages inside the run [first, first+count) of one span, as a run; None if none."""
        pages = self.host_page_pages(first)
        start = -(-first // pages) * pages
        end = (first + count) // pages * pages
        return (start, end - start) if end > start else None

    def page_runs(self, pfns: Iterable[int]) -> tuple[list[tuple[int, int]], int]:
        """Split guest PFNs into runs inside the balloon's RAM and a count of PFNs outside it.

        Duplicates collapse into one page; the runs never cross a region boundary.
        """
        unique = sorted({int(pfn) for pfn in pfns})
        result: list[tuple[int, int]] = []
        inside = 0
        for first, end in self.spans:
            low, high = bisect_left(unique, first), bisect_left(unique, end)
            result += runs(unique[low:high])
            inside += high - low
        return result, len(unique) - inside

    def pages(self, pfns: Iterable[int]) -> tuple[set[int], int]:
        """The distinct guest PFNs inside the balloon's RAM, and a count of those outside it.

        For the deflate queue, which discards nothing: building runs there cost 35x a per-page loop.
        """
        unique = set(pfns)
        inside: set[int] = set()
        for first, end in self.spans:  # one pass per span (boot RAM below and above 4G, virtio-mem): no any()
            inside.update(pfn for pfn in unique if first <= pfn < end)
        return inside, len(unique) - len(inside)

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
    """One byte (0 or 1) per 4 KiB guest page, PFN 0 up to `size`; runs outside it are clipped."""

    def __init__(self, size: int):
        self.bits = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.bits)

    def count(self) -> int:
        return self.bits.count(1)

    def _window(self, first: int, count: int) -> tuple[int, int]:
        """[first, first+count) clipped to the bitmap, as (start, end) with start <= end."""
        start = min(max(first, 0), self.size)
        return start, max(min(first + count, self.size), start)

    def set_run(self, first: int, count: int) -> int:
        """Set [first, first+count); return how many bits were newly set."""
        first, end = self._window(first, count)
        added = end - first - self.bits.count(1, first, end)
        self.bits[first:end] = b"\x01" * (end - first)
        return added

    def clear_run(self, first: int, count: int) -> int:
        """Clear [first, first+count); return how many bits were set before."""
        first, end = self._window(first, count)
        removed = self.bits.count(1, first, end)
        self.bits[first:end] = bytes(end - first)
        return removed

    def clear_pages(self, pfns: Iterable[int]) -> int:
        """Clear the bits of `pfns` (those outside the bitmap are ignored); return how many were set before."""
        bits, size, removed = self.bits, len(self.bits), 0
        for pfn in pfns:
            if 0 <= pfn < size and bits[pfn]:
                bits[pfn] = 0
                removed += 1
        return removed

    def clear_mask(self, mask: np.ndarray) -> int:
        """Clear every bit set in the boolean array `mask` (indexed by PFN); return how many were set."""
        import numpy as np

        mask = np.asarray(mask, dtype=bool)[: self.size]
        window = np.frombuffer(self.bits, dtype=bool)[: mask.size]  # a view: writes go to self.bits
        removed = int(np.count_nonzero(window & mask))
        window &= ~mask
        return removed

    def clear_pfn_array(self, pfns: np.ndarray) -> int:
        """Clear the bits of the PFNs in the integer array `pfns` (outside ones ignored); return how many were set.

        Work in proportion to `pfns`, not to the bitmap (a free page hint asks this of every write since the
        previous hint)."""
        import numpy as np

        pfns = np.asarray(pfns, dtype=np.int64)
        pfns = pfns[(pfns >= 0) & (pfns < self.size)]
        window = np.frombuffer(self.bits, dtype=np.uint8)  # a view: writes go to self.bits
        removed = int(np.count_nonzero(window[pfns]))
        window[pfns] = 0
        return removed

    def clear_dirty(self, dirty: np.ndarray) -> int:
        """Clear a dirty log answer: a bool mask indexed by PFN (`clear_mask`) or an array of PFNs."""
        if dirty.dtype == bool:
            return self.clear_mask(dirty)
        return self.clear_pfn_array(dirty)

    def to_array(self) -> np.ndarray:
        """A copy as a numpy bool array indexed by PFN (for migration, whose dirty masks are numpy too)."""
        import numpy as np

        return np.frombuffer(self.bits, dtype=bool).copy()

    def ranges(self) -> Iterator[tuple[int, int]]:
        """The set bits as (first PFN, count) runs, in order."""
        bits = self.bits
        start = bits.find(1)
        while start >= 0:
            end = bits.find(0, start)
            end = len(bits) if end < 0 else end
            yield start, end - start
            start = bits.find(1, end)

    def clear(self) -> None:
        self.bits[:] = bytes(self.size)
