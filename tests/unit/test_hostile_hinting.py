"""Free page hinting applies only the written pages to its hints (issue 12 item 8).

Before each hint the device applies the writes logged since the previous one. It used to build a bool per page
of RAM from KVM's bitmap and AND it into the hint bitmap; now the log answers the written PFNs
(`DirtyConsumer.take_pfns_claiming` of memvisor/vmm/dirty_tracker.py, the Machine's `dirty_pfns`) and only
those are cleared; the tracker keeps its bits packed with the words touched since the last take, so no step
walks a bool per page of RAM. These tests check that the answer is exact and that neither the hints nor
migration miss a write; what it costs per hint at 1 and 16 GiB is measured by `benchmarks/hinting_cost.py`
(timings are a benchmark's job, not a unit test's).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.balloon.pages import PageBitmap
from memvisor.kvm import structs
from memvisor.vmm.dirty_tracker import DirtyTracker

from .kvm_fakes import FakeVm, ManualFakeVm

GiB = 1 << 30


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, (1 << 18) - 1), max_size=200), st.sets(st.integers(0, (1 << 16) - 1), max_size=50))
def test_take_pfns_answers_exactly_the_written_pages(low: set[int], high: set[int]) -> None:
    vm = FakeVm([(0, 1 * GiB), (4 * GiB, 256 << 20)])
    log = DirtyTracker(vm, lambda slot: True).subscribe("hinting")
    for pfn in low:
        vm.write(pfn << 12)
    for pfn in high:
        vm.write(4 * GiB + (pfn << 12))
    expected = sorted(low | {(4 * GiB >> 12) + pfn for pfn in high})
    assert log.take_pfns().tolist() == expected
    assert log.take_pfns().size == 0  # handed out once, like take_mask()
    assert vm.slots[0].flags & structs.KVM_MEM_LOG_DIRTY_PAGES


def test_clearing_hints_by_pfn_array_matches_the_mask() -> None:
    a, b = PageBitmap(1 << 16), PageBitmap(1 << 16)
    for bitmap in (a, b):
        bitmap.set_run(100, 5000)
    pfns = np.array([99, 100, 101, 4000, 5099, 5100, 70000, -1])
    mask = np.zeros(1 << 16, dtype=bool)
    mask[[99, 100, 101, 4000, 5099, 5100]] = True
    assert a.clear_dirty(pfns) == b.clear_dirty(mask) == 4
    assert a.bits == b.bits




@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "mark", "take"]), st.integers(0, (1 << 14) - 1),
                          st.integers(1, 3000)), max_size=60))  # fmt: skip
def test_takes_by_pfn_between_writes_and_marks_answer_exactly_what_was_written(
    events: list[tuple[str, int, int]],
) -> None:
    """Many takes, the VMM's own writes (`mark`, up to whole words and more) and a memslot off a 64-page boundary
    (its bits are placed one by one): each take answers exactly the pages written since the previous one,
    through the touched-word list and, once that overflows, the scan of every word."""
    vm = FakeVm([(0, 64 << 20), ((1 << 14) + 5 << 12, 1 << 20)])  # 64 MiB, then 256 pages from PFN 16389
    tracker = DirtyTracker(vm, lambda slot: True)
    log = tracker.subscribe("hinting")
    limit = (1 << 14) + 5 + 256
    pending: set[int] = set()
    for action, pfn, length in events:
        if action == "write":
            for page in (pfn, (1 << 14) + 5 + pfn % 256):
                vm.write(page << 12)
                pending.add(page)
        elif action == "mark":
            tracker.mark((pfn << 12) + 100, length << 12)
            pending |= set(range(pfn, min(pfn + length + 1, limit)))
        else:
            assert log.take_pfns().tolist() == sorted(pending)
            pending = set()
    assert np.flatnonzero(log.take_mask()).tolist() == sorted(pending)


CHUNKS = [(0, 64), (64, 64), (128, 64), (192, 64), (300, 64)]  # the last memslot starts off a 64-page boundary
PAGES = [0, 63, 64, 300, 363]  # few pages, so that events meet on them


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 4), st.sampled_from(PAGES), st.integers(1, 80)), max_size=40))
def test_hints_claiming_their_pages_keep_no_written_page_and_migration_misses_no_write(
    manual_kvm: bool, events: list[tuple[int, int, int]]
) -> None:
    """The device's path (a hint takes the written PFNs claiming its own pages, which clears them in KVM under
    manual protection) interleaved with a pre-copy (clear a chunk, forget what it reads, read it) over two
    memslots, one off a 64-page boundary, with and without manual protection: the destination ends equal to
    the source, and no page written after its latest hint is still hinted once the log is applied."""
    vm = ManualFakeVm([(0, 256 << 12), (300 << 12, 64 << 12)], supported=manual_kvm)
    tracker = DirtyTracker(vm, lambda slot: True)
    hinting = tracker.subscribe("hinting")
    migration = tracker.subscribe("migration", manual=True)
    assert migration.manual == manual_kvm
    valid = [pfn for first, count in CHUNKS for pfn in range(first, first + count)]  # the RAM's PFNs
    source: dict[int, int] = dict.fromkeys(valid, 0)
    destination: dict[int, int | None] = dict.fromkeys(valid, None)
    hints = PageBitmap(364)
    written_after_hint: set[int] = set()
    wanted = np.ones(364, dtype=bool)
    chunk = 0

    def send_chunk() -> None:
        nonlocal chunk, wanted
        first, count = CHUNKS[chunk]
        if migration.manual:
            tracker.clear(first << 12, count << 12)
        part = wanted[first : first + count].copy()
        if migration.manual:
            migration.forget(first, part)
        for offset in np.flatnonzero(part).tolist():
            destination[first + offset] = source[first + offset]
        chunk = (chunk + 1) % len(CHUNKS)
        if chunk == 0:
            wanted = migration.take_mask()

    def write(pfn: int) -> None:
        source[pfn] += 1
        if hints.bits[pfn]:
            written_after_hint.add(pfn)

    for action, pfn, length in events:
        if action <= 1:  # the guest writes
            vm.write(pfn << 12)
            write(pfn)
        elif action == 2:  # the VMM writes through its mapping (a used ring)
            tracker.mark(pfn << 12, 1)
            write(pfn)
        elif action == 3:  # a hint of [pfn, pfn+length) inside one memslot, as the device records it
            first, count = next((f, c) for f, c in CHUNKS if f <= pfn < f + c)
            length = min(length, first + count - pfn)
            hints.clear_dirty(hinting.take_pfns_claiming(pfn, length))
            hints.set_run(pfn, length)
            written_after_hint -= set(range(pfn, pfn + length))
        else:  # the pre-copy goes on up to and including the chunk that holds pfn
            while True:
                first, count = CHUNKS[chunk]
                send_chunk()
                if first <= pfn < first + count:
                    break
    while chunk:  # the pass under way ends, then the final pass (the guest stopped)
        send_chunk()
    wanted |= migration.take_mask()
    for _ in CHUNKS:
        send_chunk()
    assert destination == source
    hints.clear_dirty(hinting.take_pfns())  # what the adapter does before every read of the hints
    still = [pfn for pfn in written_after_hint if hints.bits[pfn]]
    assert still == [], f"pages written after their hint still hinted: {still}"


def test_a_hint_under_manual_protection_clears_its_pages_only_after_reading_kvm() -> None:
    """A page migration read (its chunk cleared) is written again, then hinted: the hint's read of KVM comes
    before its clear, so migration still gets the second write."""
    vm = ManualFakeVm([(0, 256 << 12)])
    tracker = DirtyTracker(vm, lambda slot: True)
    hinting = tracker.subscribe("hinting")
    migration = tracker.subscribe("migration", manual=True)
    vm.write(5 << 12)
    tracker.clear(0, 64 << 12)  # migration's pre-copy reaches the chunk ...
    migration.forget(0, np.ones(64, dtype=bool))  # ... and reads its pages
    vm.write(5 << 12)  # written again after that read
    assert hinting.take_pfns_claiming(0, 256).tolist() == [5]  # the guest hinted it (after its write)
    assert vm.clears[-1] == (0, 0, 256)
    assert np.flatnonzero(migration.take_mask()).tolist() == [5]


def test_a_hint_under_manual_protection_is_not_voided_again_by_the_writes_before_it() -> None:
    """The driver's zeroing of a block before it hints the block: handed out once (the hint's own take), then
    cleared in KVM, so later takes do not void the hint; a write after the hint is logged anew."""
    vm = ManualFakeVm([(0, 256 << 12)])
    tracker = DirtyTracker(vm, lambda slot: True)
    hinting = tracker.subscribe("hinting")
    tracker.subscribe("migration", manual=True)
    vm.write(70 << 12)
    hints = PageBitmap(256)
    hints.clear_dirty(hinting.take_pfns_claiming(64, 64))
    hints.set_run(64, 64)
    hints.clear_dirty(hinting.take_pfns())  # the next hint's (or migration's read's) take
    assert hints.count() == 64
    vm.write(70 << 12)
    hints.clear_dirty(hinting.take_pfns())
    assert hints.count() == 63 and not hints.bits[70]
