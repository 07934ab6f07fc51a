"""KVM dirty page logging over guest RAM: which 4 KiB pages the guest wrote since the last look.

KVM keeps a dirty bitmap for each memory slot registered with KVM_MEM_LOG_DIRTY_PAGES (Linux
Documentation/virt/kvm/api.rst, 4.35 KVM_SET_USER_MEMORY_REGION and 4.8 KVM_GET_DIRTY_LOG). KVM_GET_DIRTY_LOG
copies a slot's bitmap out and clears it (memvisor does not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, so
"get" also re-arms write protection): each call answers "written since the previous call". The bitmap is an
array of 64-bit little-endian words, bit i of word j standing for page 64*j + i of the slot, so read as bytes
it is simply least-significant-bit first: `numpy.unpackbits(..., bitorder="little")`.

    log = DirtyLog(machine.vm, [0, 1])    # the boot RAM slots
    log.start()                            # from now on KVM records writes
    dirty = log.fetch()                    # bool array by guest PFN: written since start() / the last fetch
    log.stop()

DirtyLog hands each written page to one caller: memvisor's Machine reads KVM through
memvisor/vmm/dirty_tracker.py instead, which gives every consumer (free page hinting, migration) every page.

Only the guest's own writes (through its page tables) are logged; the VMM's writes into guest memory through
its host mapping (virtio rings, device buffers) are not. numpy is imported on first use, not at start-up.
"""

from __future__ import annotations

import ctypes
import threading
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
    """What DirtyLog needs from memvisor.kvm.system.Vm (tests pass a fake)."""

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


class DirtyLog:
    """Dirty logging on a set of KVM memory slots, answered as one bool array indexed by guest PFN.

    Thread-safe: the vCPU threads (hinting devices) and the control thread may fetch concurrently; each
    written page is reported to exactly one fetch.
    """

    def __init__(self, vm: DirtyLogVm, slots: Iterable[int]) -> None:
        self._vm = vm
        self._slots = sorted(slots)
        self._buffers: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self._lock = threading.Lock()
        self.active = False

    @property
    def pfn_limit(self) -> int:
        """One past the highest guest PFN of the logged slots: the length of `fetch()`'s array."""
        return max(((s.guest_phys_addr + s.size) >> PAGE_SHIFT for s in self._slot_infos()), default=0)

    def _slot_infos(self) -> list[MemorySlot]:
        return [self._vm.slots[slot] for slot in self._slots]

    def _set_logging(self, on: bool) -> None:
        set_dirty_logging(self._vm, self._slot_infos(), on)

    def start(self) -> None:
        """Re-register every slot with KVM_MEM_LOG_DIRTY_PAGES; a no-op when logging is on already."""
        with self._lock:
            if self.active:
                return
            for info in self._slot_infos():
                self._buffers[info.slot] = ctypes.create_string_buffer(bitmap_bytes(info.size >> PAGE_SHIFT))
            self._set_logging(True)
            self.active = True

    def stop(self) -> None:
        """Register the slots without dirty logging again (KVM drops its bitmaps)."""
        with self._lock:
            if not self.active:
                return
            self._set_logging(False)
            self.active = False
            self._buffers.clear()

    def fetch_pfns(self) -> np.ndarray:
        """The guest PFNs written since `start()` or the previous fetch, sorted (an int64 array).

        Costs one bitmap copy in KVM and a scan of its 64-bit words at C speed (1/64 of a page per page of
        RAM), then work in proportion to the pages written: what a free page hint can afford each time
        (`fetch()` builds a bool per page of RAM, O(RAM) in Python's terms: milliseconds for a 16 GiB guest).
        """
        import numpy as np

        found: list[np.ndarray] = []
        with self._lock:
            if not self.active:
                return np.zeros(0, dtype=np.int64)
            for info in self._slot_infos():
                buffer = self._buffers[info.slot]
                self._vm.get_dirty_log(info.slot, buffer)
                pages = info.size >> PAGE_SHIFT
                words = np.frombuffer(buffer.raw, dtype=np.uint64)
                nonzero = np.flatnonzero(words)
                if not nonzero.size:
                    continue
                bits = np.unpackbits(words[nonzero].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
                rows, cols = np.nonzero(bits)
                pfns = nonzero[rows].astype(np.int64) * 64 + cols
                pfns = pfns[pfns < pages] + (info.guest_phys_addr >> PAGE_SHIFT)
                found.append(pfns)
        return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def fetch(self) -> PageMask:
        """The pages written since `start()` or the previous fetch: a bool array indexed by guest PFN.

        Before `start()` (or after `stop()`) nothing is logged: every element is False.
        """
        import numpy as np

        with self._lock:
            dirty = np.zeros(self.pfn_limit, dtype=bool)
            if not self.active:
                return dirty
            for info in self._slot_infos():
                buffer = self._buffers[info.slot]
                self._vm.get_dirty_log(info.slot, buffer)
                pages = info.size >> PAGE_SHIFT
                first = info.guest_phys_addr >> PAGE_SHIFT
                dirty[first:first + pages] = unpack_dirty_bitmap(buffer.raw, pages)
            return dirty
