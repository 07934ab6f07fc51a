"""One dirty tracker over KVM's dirty log that hands every written page to EVERY consumer.

KVM_GET_DIRTY_LOG copies a memslot's dirty bitmap out and clears it (Linux Documentation/virt/kvm/api.rst,
4.8 KVM_GET_DIRTY_LOG; memvisor does not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): whoever reads it first
takes the bits. Several parts of memvisor need them: free page hinting (a page written after its hint loses
the hint) and live migration (a page written after it was sent is sent again). So one tracker reads KVM and
ORs each bit into the bitmap of every subscribed consumer; each consumer takes (reads and clears) only its
own bitmap.

    tracker = DirtyTracker(vm, include=lambda slot: True)
    migration = tracker.subscribe("migration")   # KVM logs writes from the first subscriber on
    hinting = tracker.subscribe("hinting")
    tracker.mark(gpa, length)                     # the VMM wrote guest memory itself (used rings, buffers)
    migration.take_mask()                         # bool array by guest PFN: written since its last take
    hinting.take_pfns()                           # the same pages, again, for the other consumer
    migration.close(); hinting.close()            # logging stops with the last consumer

What is tracked: every memslot `include` accepts (memvisor: boot RAM and virtio-mem regions, not pmem, whose
content lives in its backing file), looked up again at each read, so a memslot added later (or re-registered)
is tracked from then on and its pages are handed to every consumer as written once (nothing is known of the
writes before). Writes by the VMM through its host mapping are invisible to KVM: GuestMemory.write calls
`mark` (memvisor.memory.guest_memory.GuestMemory.on_write).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from memvisor.kvm import structs
from memvisor.vmm.dirty_log import PAGE_SHIFT, DirtyLogVm, bitmap_bytes, set_dirty_logging

if TYPE_CHECKING:
    import numpy as np

    from memvisor.kvm.system import MemorySlot

SlotFilter = Callable[["MemorySlot"], bool]


class DirtyConsumer:
    """One consumer's own view of the dirty pages: a bool array by guest PFN, filled by the tracker."""

    def __init__(self, tracker: DirtyTracker, name: str, limit: int) -> None:
        import numpy as np

        self.name = name
        self._tracker = tracker
        self.bits = np.zeros(limit, dtype=bool)
        self.marked = False  # any bit set since the last take (a take of nothing then costs no scan of RAM)
        self.closed = False

    def _grow(self, limit: int) -> None:
        import numpy as np

        if limit > self.bits.size:
            grown = np.zeros(limit, dtype=bool)
            grown[: self.bits.size] = self.bits
            self.bits = grown

    def take_mask(self) -> np.ndarray:
        """The pages written since this consumer's previous take (or its subscription); clears them."""
        import numpy as np

        with self._tracker.lock:
            self._tracker.sync_locked()
            taken = self.bits
            self.bits = np.zeros(taken.size, dtype=bool)
            self.marked = False
            return taken

    def take_pfns(self) -> np.ndarray:
        """`take_mask()` as a sorted int64 array of guest PFNs (nothing written: no scan of the bitmap)."""
        import numpy as np

        with self._tracker.lock:
            self._tracker.sync_locked()
            if not self.marked:
                return np.zeros(0, dtype=np.int64)
            return np.flatnonzero(self.take_mask()).astype(np.int64)

    def close(self) -> None:
        self._tracker.unsubscribe(self)


class DirtyTracker:
    """KVM dirty logging on the memslots `include` accepts, shared by any number of consumers (thread-safe)."""

    def __init__(self, vm: DirtyLogVm, include: SlotFilter) -> None:
        self._vm = vm
        self._include = include
        self.lock = threading.RLock()
        self._consumers: list[DirtyConsumer] = []
        self._logged: dict[int, tuple[int, int]] = {}  # slot -> (gpa, size) registered with logging on
        self._buffers: dict[int, ctypes.Array[ctypes.c_char]] = {}

    @property
    def active(self) -> bool:
        return bool(self._consumers)

    @property
    def consumers(self) -> list[str]:
        return [consumer.name for consumer in self._consumers]

    def _slots(self) -> list[MemorySlot]:
        return [info for info in self._vm.slots.values() if self._include(info)]

    @property
    def pfn_limit(self) -> int:
        """One past the highest guest PFN of the tracked memslots."""
        return max(((s.guest_phys_addr + s.size) >> PAGE_SHIFT for s in self._slots()), default=0)

    def subscribe(self, name: str) -> DirtyConsumer:
        """A new consumer; it sees the writes from now on. The first one turns KVM's logging on."""
        with self.lock:
            if self._consumers:
                self.sync_locked()  # writes before this consumer belong to the others only
            consumer = DirtyConsumer(self, name, self.pfn_limit)
            self._consumers.append(consumer)
            if len(self._consumers) == 1:
                self._arm_new_slots(mark=False)
            return consumer

    def unsubscribe(self, consumer: DirtyConsumer) -> None:
        """Drop `consumer`; the last one turns KVM's logging off (a no-op for one already gone)."""
        with self.lock:
            if consumer not in self._consumers:
                return
            self._consumers.remove(consumer)
            consumer.closed = True
            if not self._consumers:
                self._set_logging(False)

    def _set_logging(self, on: bool) -> None:
        set_dirty_logging(self._vm, self._slots(), on)
        if not on:
            self._logged.clear()
            self._buffers.clear()

    def _arm_new_slots(self, *, mark: bool) -> None:
        """Turn logging on for tracked memslots not logged yet; with `mark`, hand their pages out as written."""
        limit = self.pfn_limit
        for consumer in self._consumers:
            consumer._grow(limit)
        for info in self._slots():
            key = (info.guest_phys_addr, info.size)
            if self._logged.get(info.slot) == key and info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES:
                continue
            if not info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES:
                self._vm.set_memory_slot(info.slot, info.guest_phys_addr, info.size, info.userspace_addr,
                                         info.flags | structs.KVM_MEM_LOG_DIRTY_PAGES)  # fmt: skip
            self._logged[info.slot] = key
            self._buffers[info.slot] = ctypes.create_string_buffer(bitmap_bytes(info.size >> PAGE_SHIFT))
            if mark:
                first = info.guest_phys_addr >> PAGE_SHIFT
                for consumer in self._consumers:
                    consumer.bits[first : first + (info.size >> PAGE_SHIFT)] = True
                    consumer.marked = True
        for slot in [slot for slot in self._logged if slot not in self._vm.slots]:
            del self._logged[slot]
            self._buffers.pop(slot, None)

    def sync_locked(self) -> None:
        """Read KVM's bitmaps of every tracked memslot and OR them into every consumer (call under `lock`)."""
        import numpy as np

        if not self._consumers:
            return
        self._arm_new_slots(mark=True)
        for info in self._slots():
            buffer = self._buffers.get(info.slot)
            if buffer is None:
                continue
            self._vm.get_dirty_log(info.slot, buffer)
            words = np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint64)
            nonzero = np.flatnonzero(words)
            if not nonzero.size:
                continue
            bits = np.unpackbits(words[nonzero].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
            rows, cols = np.nonzero(bits)
            pfns = nonzero[rows].astype(np.int64) * 64 + cols
            pfns = pfns[pfns < (info.size >> PAGE_SHIFT)] + (info.guest_phys_addr >> PAGE_SHIFT)
            for consumer in self._consumers:
                consumer.bits[pfns] = True
                consumer.marked = True

    def sync(self) -> None:
        with self.lock:
            self.sync_locked()

    def mark(self, gpa: int, length: int) -> None:
        """The VMM wrote [gpa, gpa+length) through its own mapping: every consumer sees those pages written."""
        if not self._consumers or length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        end = (gpa + length - 1 >> PAGE_SHIFT) + 1
        with self.lock:
            for consumer in self._consumers:
                if first < consumer.bits.size:
                    consumer.bits[first : min(end, consumer.bits.size)] = True
                    consumer.marked = True
