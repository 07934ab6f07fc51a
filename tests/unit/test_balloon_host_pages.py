"""The balloon on RAM whose host pages are bigger than the guest's 4 KiB (hugetlbfs 2 MiB), against a model.

The RAM region of `balloon_memory()` is a 4 KiB memfd told it sits on 2 MiB host pages (`page_size`): what the
balloon discards is then visible page by page (a discarded 4 KiB page reads as zeros and leaves the memfd's
allocated blocks), and `GuestMemory.discard` refuses anything that is not whole 2 MiB pages, as a hugetlbfs
memfd would need. The same model runs on 4 KiB host pages, where every inflated page goes back at once.

The model: the guest wrote a marker into every page of a window of RAM; the set of pages in the balloon; for
each page, whether it still holds its marker. A page is given back (reads zero, costs nothing) exactly when
its whole host page is in the balloon (inflate) or inside a reported range; a deflated page is used by the
guest again (its marker written back). After every operation the memory, its allocated bytes and the device's
inflated count agree with the model: nothing the guest still uses is freed, no fully inflated host page is
kept (leaked).
"""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.testing import RAM_GPA, RAM_PFN, TOTAL_RAM, BalloonDriver, MiB, balloon_memory
from memvisor.memory.guest_memory import GuestMemory

PAGE = 4096
HUGE = 2 * MiB
HOST_PAGES = 2  # the window: two 2 MiB host pages
WINDOW = HOST_PAGES * HUGE // PAGE  # 1024 guest pages
MARK = struct.Struct("<Q")


def _memory(host_page: int) -> GuestMemory:
    memory = balloon_memory()
    memory.regions[1].page_size = host_page
    return memory


def _mark(memory: GuestMemory, pfns: range | list[int]) -> None:
    for pfn in pfns:
        memory.write(pfn * PAGE, MARK.pack(pfn + 1))


class Model:
    def __init__(self, host_page: int) -> None:
        self.per_host = host_page // PAGE
        self.inflated: set[int] = set()
        self.marked = set(range(RAM_PFN, RAM_PFN + WINDOW))

    def host_page(self, pfn: int) -> range:
        start = pfn - (pfn - RAM_PFN) % self.per_host
        return range(start, start + self.per_host)

    def inflate(self, pfns: list[int]) -> None:
        self.inflated.update(pfns)
        for pfn in pfns:
            page = self.host_page(pfn)
            if all(p in self.inflated for p in page):
                self.marked.difference_update(page)

    def deflate(self, pfns: list[int]) -> None:
        self.inflated.difference_update(pfns)
        self.marked.update(pfns)  # the guest uses its pages again

    def report(self, first: int, count: int) -> None:
        start = RAM_PFN + -(-(first - RAM_PFN) // self.per_host) * self.per_host
        end = RAM_PFN + (first + count - RAM_PFN) // self.per_host * self.per_host
        self.marked.difference_update(range(start, end))


def _check(memory: GuestMemory, device: BalloonDevice, model: Model) -> None:
    ram = memory.regions[1]
    assert ram.fd is not None
    # Through the file, not the mapping: a read fault on a hole in shared memory would allocate the page.
    window = os.pread(ram.fd, WINDOW * PAGE, RAM_GPA - ram.gpa)
    for index in range(WINDOW):
        pfn = RAM_PFN + index
        (value,) = MARK.unpack_from(window, index * PAGE)
        expected = pfn + 1 if pfn in model.marked else 0
        assert value == expected, f"page {pfn - RAM_PFN} of the window: {value} where the model has {expected}"
    assert memory.allocated_bytes(memory.regions[1]) == len(model.marked) * PAGE
    assert device.inflated_pages() == len(model.inflated)


# A run of pages in the window, at a 64-page grain so that a few runs fill a whole 2 MiB host page.
runs = st.tuples(st.integers(0, WINDOW // 64 - 1), st.sampled_from([1, 64, 128, 256])).map(
    lambda r: list(range(RAM_PFN + r[0] * 64, RAM_PFN + min(r[0] * 64 + r[1], WINDOW)))
)
scattered = st.lists(st.integers(RAM_PFN, RAM_PFN + WINDOW - 1), min_size=1, max_size=256)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("inflate"), st.one_of(runs, scattered)),
        st.tuples(st.just("deflate"), st.one_of(runs, scattered)),
        st.tuples(st.just("report"), st.tuples(st.integers(0, WINDOW - 1), st.integers(1, WINDOW))),
    ),
    max_size=24,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([HUGE, PAGE]), operations)
def test_the_host_gets_back_exactly_the_whole_host_pages_in_the_balloon(host_page: int, ops: list) -> None:
    memory = _memory(host_page)
    with memory:
        device = BalloonDevice(TOTAL_RAM, free_page_reporting=True, page_poison=False)
        driver = BalloonDriver(device, memory)
        model = Model(host_page)
        _mark(memory, range(RAM_PFN, RAM_PFN + WINDOW))
        for kind, arg in ops:
            if kind == "inflate":
                driver.inflate(arg)
                model.inflate(arg)
            elif kind == "deflate":
                driver.deflate(arg)
                _mark(memory, sorted(set(arg)))  # the guest writes to the pages it got back
                model.deflate(arg)
            else:
                first, count = RAM_PFN + arg[0], min(arg[1], WINDOW - arg[0])
                driver.report([(first * PAGE, count * PAGE)])
                model.report(first, count)
            _check(memory, device, model)
        assert not driver.broken
        assert device.counters["discard_failures"] == 0


def test_a_host_page_goes_back_with_its_last_guest_page_in_any_order() -> None:
    memory = _memory(HUGE)
    with memory:
        device = BalloonDevice(TOTAL_RAM)
        driver = BalloonDriver(device, memory)
        _mark(memory, range(RAM_PFN, RAM_PFN + 512))
        held = memory.allocated_bytes(memory.regions[1])
        order = list(range(RAM_PFN, RAM_PFN + 512))[::-1]  # highest first, in two buffers
        driver.inflate(order[:256])
        driver.inflate(order[256:511])
        assert memory.allocated_bytes(memory.regions[1]) == held  # 511 of 512: nothing freed
        assert device.counters["bytes_discarded"] == 0
        driver.inflate(order[511:])
        assert memory.allocated_bytes(memory.regions[1]) == held - HUGE
        assert device.counters["bytes_discarded"] == HUGE


def test_reset_forgets_a_partly_inflated_host_page() -> None:
    """After a reset the guest owns every page again: inflating the rest of a host page frees nothing."""
    memory = _memory(HUGE)
    with memory:
        device = BalloonDevice(TOTAL_RAM)
        driver = BalloonDriver(device, memory)
        _mark(memory, range(RAM_PFN, RAM_PFN + 512))
        driver.inflate(range(RAM_PFN, RAM_PFN + 256))
        device.reset()
        driver = BalloonDriver(device, memory)
        driver.inflate(range(RAM_PFN + 256, RAM_PFN + 512))
        assert device.counters["bytes_discarded"] == 0
        assert memory.read(RAM_GPA, 8) == MARK.pack(RAM_PFN + 1)
        driver.inflate(range(RAM_PFN, RAM_PFN + 256))  # now the whole host page is in the balloon again
        assert device.counters["bytes_discarded"] == HUGE
        assert memory.read(RAM_GPA, 8) == bytes(8)


def test_a_report_gives_back_only_the_whole_host_pages_inside_it() -> None:
    memory = _memory(HUGE)
    with memory:
        device = BalloonDevice(TOTAL_RAM, free_page_reporting=True, page_poison=False)
        driver = BalloonDriver(device, memory)
        _mark(memory, range(RAM_PFN, RAM_PFN + 1536))
        driver.report([(RAM_GPA + PAGE, 4 * MiB)])  # covers host page 1 whole, pages 0 and 2 in part
        assert device.counters["bytes_discarded"] == HUGE
        assert memory.read(RAM_GPA + PAGE, 8) != bytes(8)  # host page 0 kept whole
        assert memory.read(RAM_GPA + HUGE, HUGE) == bytes(HUGE)
        assert memory.read(RAM_GPA + 2 * HUGE, 8) != bytes(8)
