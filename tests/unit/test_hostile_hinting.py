"""Free page hinting applies only the written pages to its hints (issue 12 item 8).

Before each hint the device applies the writes logged since the previous one. It used to build a bool per page
of RAM from KVM's bitmap and AND it into the hint bitmap; now the log answers the written PFNs
(`DirtyConsumer.take_pfns` of memvisor/vmm/dirty_tracker.py, the Machine's `dirty_pfns`) and only those are
cleared. These tests check that the answer is exact; what it costs per hint at 1 and 16 GiB is measured by
`benchmarks/hinting_cost.py` (timings are a benchmark's job, not a unit test's).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.balloon.pages import PageBitmap
from memvisor.kvm import structs
from memvisor.vmm.dirty_tracker import DirtyTracker

from .kvm_fakes import FakeVm

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


