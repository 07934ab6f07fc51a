"""A fake KVM VM for the dirty log tests: memslots and the pages written in each, no /dev/kvm."""

from __future__ import annotations

import ctypes

from memvisor.kvm import structs
from memvisor.kvm.system import MemorySlot


def kvm_bitmap(dirty: set[int], pages: int) -> bytes:
    """What KVM writes: unsigned longs (64-bit, little-endian), bit i of word j for page 64*j + i."""
    words = [0] * (-(-pages // 64))
    for page in dirty:
        words[page // 64] |= 1 << (page % 64)
    return b"".join(word.to_bytes(8, "little") for word in words)


class FakeVm:
    """Memslots and per-slot dirty pages, as KVM keeps them; get_dirty_log hands them out once."""

    def __init__(self, slots: list[tuple[int, int]]) -> None:
        self.slots = {i: MemorySlot(i, gpa, size, 0x7F0000000000 + gpa, 0) for i, (gpa, size) in enumerate(slots)}
        self.written: dict[int, set[int]] = {i: set() for i in self.slots}
        self.calls: list[tuple[int, int]] = []

    def set_memory_slot(self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0) -> None:
        self.calls.append((slot, flags))
        self.slots[slot] = MemorySlot(slot, gpa, size, userspace_addr, flags)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        info = self.slots[slot]
        assert info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES, "KVM refuses a slot without dirty logging"
        pages = info.size >> 12
        data = kvm_bitmap(self.written[slot], pages)
        assert len(bitmap) >= len(data)
        ctypes.memmove(bitmap, data, len(data))
        self.written[slot] = set()

    def write(self, gpa: int) -> None:
        for info in self.slots.values():
            if info.guest_phys_addr <= gpa < info.guest_phys_addr + info.size:
                self.written[info.slot].add((gpa - info.guest_phys_addr) >> 12)
