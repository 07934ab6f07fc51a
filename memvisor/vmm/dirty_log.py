"""KVM dirty page logging over guest RAM: which 4 KiB pages the guest wrote since the last look.

KVM keeps a dirty bitmap for each memory slot registered with KVM_MEM_LOG_DIRTY_PAGES (Linux
Documentation/virt/kvm/api.rst, 4.35 KVM_SET_USER_MEMORY_REGION and 4.8 KVM_GET_DIRTY_LOG). KVM_GET_DIRTY_LOG
copies a slot's bitmap out and clears it (memvisor does not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, so
"get" also re-arms write protection): each call answers "written since the previous call". The bitmap is an
array of 64-bit little-endian words, bit i of word j standing for page 64*j + i of the slot, so read as bytes
it is simply least-significant-bit first: `numpy.unpackbits(..., bitorder="little")`.

This module holds the pieces of that interface: the bitmap's size and layout and the memslot flag toggle.
memvisor/vmm/dirty_tracker.py reads KVM with them and hands every written page to every consumer (free page
hinting, migration).

Only the guest's own writes (through its page tables) are logged; the VMM's writes into guest memory through
its host mapping (virtio rings, device buffers) are not (DirtyTracker.mark adds those). numpy is imported on
first use, not at start-up.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, TypeAlias

from memvisor.kvm import structs

if TYPE_CHECKING:
    import numpy as np

    from memvisor.kvm.system import MemorySlot

PageMask: TypeAlias = "np.ndarray"  # a bool array indexed by guest PFN (numpy stays unimported until used)
PAGE_SHIFT = 12  # KVM logs in 4 KiB pages on x86
WORD_BYTES = 8  # the bitmap is an array of unsigned long (64-bit on x86_64)


class DirtyLogVm(Protocol):
    """What dirty logging needs from memvisor.kvm.system.Vm (tests pass a fake)."""

    slots: dict[int, MemorySlot]

    def set_memory_slot(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None: ...

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None: ...  # type: ignore[type-arg]


def bitmap_bytes(pages: int) -> int:
    """Bytes of the KVM dirty bitmap for a slot of `pages` pages (whole 64-bit words)."""
    return -(-pages // 64) * WORD_BYTES


def unpack_dirty_bitmap(bitmap: bytes | bytearray | memoryview, pages: int) -> PageMask:
    """KVM's dirty bitmap of a `pages`-page slot as a bool array: element i is True when page i was written.

    Bits past `pages` in the last word are ignored; a bitmap shorter than `pages` bits is a ValueError.
    """
    import numpy as np

    raw = np.frombuffer(bitmap, dtype=np.uint8)
    if raw.size * 8 < pages:
        raise ValueError(f"a dirty bitmap of {raw.size} bytes cannot cover {pages} pages")
    return np.unpackbits(raw, count=pages, bitorder="little").view(bool)


def set_dirty_logging(vm: DirtyLogVm, slots: Iterable[MemorySlot], on: bool) -> None:
    """Re-register each of `slots` with KVM_MEM_LOG_DIRTY_PAGES set (`on`) or clear; slots already so are left alone."""
    for info in slots:
        flags = info.flags | structs.KVM_MEM_LOG_DIRTY_PAGES if on else info.flags & ~structs.KVM_MEM_LOG_DIRTY_PAGES
        if flags != info.flags:
            vm.set_memory_slot(info.slot, info.guest_phys_addr, info.size, info.userspace_addr, flags)

