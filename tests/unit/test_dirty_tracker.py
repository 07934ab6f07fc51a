"""One dirty tracker, many consumers (memvisor.vmm.dirty_tracker), over a fake KVM dirty log."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.kvm import structs
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.vmm.dirty_tracker import DirtyTracker

from .kvm_fakes import FakeVm, ManualFakeVm

MiB = 1 << 20
RAM = (0, 4 * MiB)
HOTPLUG = (16 * MiB, 2 * MiB)  # a virtio-mem region's memslot


def tracked(vm: FakeVm) -> DirtyTracker:
    return DirtyTracker(vm, lambda slot: True)


def test_every_consumer_gets_every_dirty_page() -> None:
    vm = FakeVm([RAM, HOTPLUG])
    tracker = tracked(vm)
    migration = tracker.subscribe("migration")
    hinting = tracker.subscribe("hinting")
    for gpa in (0x1000, 0x3000, HOTPLUG[0] + 0x5000):
        vm.write(gpa)
    assert hinting.take_pfns().tolist() == [1, 3, (HOTPLUG[0] >> 12) + 5]  # hinting reads first ...
    vm.write(0x2000)
    assert migration.take_pfns().tolist() == [1, 2, 3, (HOTPLUG[0] >> 12) + 5]  # ... migration still gets all
    assert hinting.take_pfns().tolist() == [2]
    assert migration.take_pfns().tolist() == []


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, (4 * MiB >> 12) - 1)), max_size=60))
def test_consumers_reading_in_any_order_each_see_all_writes(events: list[tuple[int, int]]) -> None:
    vm = FakeVm([RAM])
    tracker = tracked(vm)
    consumers = [tracker.subscribe("a"), tracker.subscribe("b")]
    seen: list[set[int]] = [set(), set()]
    written: set[int] = set()
    for action, pfn in events:
        if action == 2:
            vm.write(pfn << 12)
            written.add(pfn)
        else:
            seen[action] |= set(consumers[action].take_pfns().tolist())
    for index in (0, 1):
        seen[index] |= set(consumers[index].take_pfns().tolist())
    assert seen == [written, written]


def test_logging_on_with_the_first_consumer_off_after_the_last() -> None:
    vm = FakeVm([RAM, HOTPLUG])
    tracker = tracked(vm)
    first = tracker.subscribe("a")
    assert all(info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES for info in vm.slots.values())
    second = tracker.subscribe("b")
    first.close()
    assert all(info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES for info in vm.slots.values())
    second.close()
    assert not any(info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES for info in vm.slots.values())
    assert not tracker.active


def test_a_late_subscriber_does_not_see_older_writes() -> None:
    vm = FakeVm([RAM])
    tracker = tracked(vm)
    early = tracker.subscribe("early")
    vm.write(0x4000)
    late = tracker.subscribe("late")
    vm.write(0x8000)
    assert early.take_pfns().tolist() == [4, 8]
    assert late.take_pfns().tolist() == [8]


def test_a_memslot_added_later_is_tracked_and_handed_out_whole() -> None:
    vm = FakeVm([RAM])
    tracker = tracked(vm)
    consumer = tracker.subscribe("migration")
    vm.set_memory_slot(1, HOTPLUG[0], HOTPLUG[1], 0x7F0000000000 + HOTPLUG[0])  # plugged memory appears
    vm.written[1] = set()
    mask = consumer.take_mask()
    first = HOTPLUG[0] >> 12
    assert mask.size == (HOTPLUG[0] + HOTPLUG[1]) >> 12
    assert mask[first : first + (HOTPLUG[1] >> 12)].all() and not mask[:first].any()
    assert vm.slots[1].flags & structs.KVM_MEM_LOG_DIRTY_PAGES
    vm.write(HOTPLUG[0] + 0x1000)
    assert consumer.take_pfns().tolist() == [first + 1]


def test_untracked_memslots_are_left_alone() -> None:
    vm = FakeVm([RAM, HOTPLUG])
    tracker = DirtyTracker(vm, lambda slot: slot.slot == 0)  # e.g. pmem is not tracked
    consumer = tracker.subscribe("migration")
    assert not vm.slots[1].flags & structs.KVM_MEM_LOG_DIRTY_PAGES
    vm.write(0x1000)
    assert consumer.take_pfns().tolist() == [1]


def test_the_vmm_s_own_writes_to_guest_memory_are_marked_for_every_consumer() -> None:
    vm = FakeVm([RAM])
    memory = GuestMemory([MemoryRegion.memfd(0, RAM[1])])
    tracker = tracked(vm)
    memory.on_write = tracker.mark
    memory.write(0x2FFE, b"abcd")  # a used-ring entry across a page boundary
    a, b = tracker.subscribe("a"), tracker.subscribe("b")
    memory.write_u16(0x5000, 7)
    memory.write(0x2FFE, b"abcd")
    assert a.take_pfns().tolist() == [2, 3, 5]
    assert b.take_pfns().tolist() == [2, 3, 5]
    memory.close()


def test_marks_with_no_consumer_cost_nothing_and_masks_are_numpy() -> None:
    vm = FakeVm([RAM])
    tracker = tracked(vm)
    tracker.mark(0, 4096)
    consumer = tracker.subscribe("a")
    assert isinstance(consumer.take_mask(), np.ndarray)
    assert consumer.take_pfns().size == 0


# --- manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CLEAR_DIRTY_LOG) -------------------------------


def test_manual_protection_is_on_only_while_a_manual_consumer_is_and_only_where_kvm_has_it() -> None:
    vm = ManualFakeVm([RAM])
    tracker = tracked(vm)
    hinting = tracker.subscribe("hinting")
    assert not vm.manual and not hinting.manual
    migration = tracker.subscribe("migration", manual=True)
    assert vm.manual and migration.manual and tracker.manual
    vm.write(0x5000)
    assert hinting.take_pfns().tolist() == [5]
    assert hinting.take_pfns().tolist() == [5]  # not cleared yet: still "maybe written"
    tracker.clear(0, 64 << 12)
    assert vm.clears == [(0, 0, 64)]
    assert hinting.take_pfns().tolist() == [5]  # the clear's own read handed it out once more ...
    assert hinting.take_pfns().tolist() == []  # ... and then it is gone
    migration.close()
    assert not vm.manual and not tracker.manual
    older = ManualFakeVm([RAM], supported=False)
    consumer = DirtyTracker(older, lambda slot: True).subscribe("migration", manual=True)
    assert not consumer.manual  # KVM without the capability: KVM_GET_DIRTY_LOG clears, as before


def test_a_clear_rounds_out_to_64_pages_and_stays_inside_each_slot() -> None:
    vm = ManualFakeVm([(0, 100 << 12), HOTPLUG])  # a slot of 100 pages: its last clear may end unaligned
    tracker = tracked(vm)
    tracker.subscribe("migration", manual=True)
    tracker.clear(70 << 12, 10 << 12)
    tracker.clear(90 << 12, HOTPLUG[0] + (1 << 12) - (90 << 12))  # across the hole into the second slot
    assert vm.clears == [(0, 64, 36), (0, 64, 36), (1, 0, 64)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 255)), max_size=80))
def test_manual_protection_misses_no_write_for_any_consumer(events: list[tuple[int, int]]) -> None:
    """A pre-copy over 4 chunks of 64 pages (clear the chunk, forget the pages it reads, read them) with a
    hinting-like consumer taking at random: the destination ends equal to the source, and every write
    reaches the other consumer's next take."""
    vm = ManualFakeVm([(0, 256 << 12)])
    tracker = tracked(vm)
    other = tracker.subscribe("hinting")
    migration = tracker.subscribe("migration", manual=True)
    source, destination = [0] * 256, [None] * 256
    wanted = np.ones(256, dtype=bool)
    chunk, pending = 0, set()

    def send_chunk() -> None:
        nonlocal chunk, wanted
        first = chunk * 64
        tracker.clear(first << 12, 64 << 12)
        part = wanted[first : first + 64].copy()
        migration.forget(first, part)
        for pfn in np.flatnonzero(part).tolist():
            destination[first + pfn] = source[first + pfn]
        chunk = (chunk + 1) % 4
        if chunk == 0:
            wanted = migration.take_mask()

    for action, pfn in events:
        if action <= 1:  # the guest writes
            source[pfn] += 1
            vm.write(pfn << 12)
            pending.add(pfn)
        elif action == 2:
            taken = set(other.take_pfns().tolist())
            assert pending <= taken
            pending = set()
        else:
            send_chunk()
    while chunk:  # the pass under way ends, then the final pass (the guest stopped)
        send_chunk()
    wanted |= migration.take_mask()
    for _ in range(4):
        send_chunk()
    assert destination == source
    assert pending <= set(other.take_pfns().tolist())
