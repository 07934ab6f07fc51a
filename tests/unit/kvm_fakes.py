"""A fake KVM VM for the dirty log tests: memslots and the pages written in each, no /dev/kvm."""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from memvisor.kvm import structs
from memvisor.kvm.system import MemorySlot
from memvisor.vmm.dirty_log import bitmap_bytes, unpack_dirty_bitmap


def kvm_bitmap(dirty: set[int], pages: int) -> bytes:
    """What KVM writes: unsigned longs (64-bit, little-endian), bit i of word j for page 64*j + i."""
    words = [0] * (-(-pages // 64))
    for page in dirty:
        words[page // 64] |= 1 << (page % 64)
    return b"".join(word.to_bytes(8, "little") for word in words)


class FakeVm:
    """Memslots and per-slot dirty pages, as KVM keeps them; get_dirty_log hands them out once. Thread-safe, as
    KVM is: a guest writer thread may log pages while the VMM reads the log."""

    def __init__(self, slots: list[tuple[int, int]]) -> None:
        self.lock = threading.RLock()
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
        with self.lock:
            data = kvm_bitmap(self.written[slot], pages)
            self.written[slot] = set()
        assert len(bitmap) >= len(data)
        ctypes.memmove(bitmap, data, len(data))

    def write(self, gpa: int) -> None:
        for info in self.slots.values():
            if info.guest_phys_addr <= gpa < info.guest_phys_addr + info.size:
                with self.lock:
                    self.written[info.slot].add((gpa - info.guest_phys_addr) >> 12)


class ManualFakeVm(FakeVm):
    """FakeVm that also offers KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: once enabled, get_dirty_log leaves the bits
    set (a page with its bit set takes further writes unseen: a set cannot record them twice) until
    clear_dirty_log clears the ones its bitmap names, checking KVM's alignment rules."""

    def __init__(self, slots: list[tuple[int, int]], *, supported: bool = True) -> None:
        super().__init__(slots)
        self.supported = supported
        self.manual = False
        self.clears: list[tuple[int, int, int]] = []

    def check_extension(self, capability: int) -> int:
        from memvisor.kvm import ioctls

        return int(self.supported and capability == ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)

    def enable_cap(self, capability: int, *args: int) -> None:
        if not self.supported:
            raise OSError(22, "KVM_ENABLE_CAP: Invalid argument")
        self.manual = bool(args[0] & structs.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        if not self.manual:
            super().get_dirty_log(slot, bitmap)
            return
        with self.lock:
            data = kvm_bitmap(self.written[slot], self.slots[slot].size >> 12)
        ctypes.memmove(bitmap, data, len(data))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        pages = self.slots[slot].size >> 12
        assert self.manual, "KVM refuses KVM_CLEAR_DIRTY_LOG without manual protection"
        assert first_page % 64 == 0 and (num_pages % 64 == 0 or first_page + num_pages == pages), "EINVAL"
        assert first_page + num_pages <= pages and len(bytes(bitmap)) >= bitmap_bytes(num_pages)
        bits = unpack_dirty_bitmap(bytes(bitmap), num_pages)
        with self.lock:
            self.written[slot] -= {first_page + i for i in np.flatnonzero(bits).tolist()}
        self.clears.append((slot, first_page, num_pages))
