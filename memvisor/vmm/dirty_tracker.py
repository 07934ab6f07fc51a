"""One dirty tracker over KVM's dirty log that hands every written page to EVERY consumer.

KVM_GET_DIRTY_LOG copies a memslot's dirty bitmap out and clears it (Linux Documentation/virt/kvm/api.rst,
KVM_GET_DIRTY_LOG): whoever reads it first takes the bits. Several parts of memvisor need them: free page hinting (a page written after its hint loses
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

Manual protection (api.rst, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and KVM_CLEAR_DIRTY_LOG), while a consumer
subscribed with `manual=True` (live migration) exists and KVM offers it: KVM_GET_DIRTY_LOG then neither clears
the bits nor write-protects the pages again; a page's bit stays set, and further writes to it go unseen,
until `clear(gpa, size)` clears it. So every read hands out every bit still set (a page stays "maybe
written" for every consumer until cleared: never a write missed, at worst a page reported twice), and
`clear` reads KVM first (every consumer gets the bits) and clears just those bits, under the lock. The
manual consumer clears each 64 MiB chunk right before it reads the chunk's pages, so a write lands either
before the read (and is sent) or after the clear (and is logged); then it `forget`s the pages it is about to
read, whose bits it got again from that read of KVM. Before, KVM re-protected all pages at the end of a
pass, and a page written between that and its send in the next pass was sent again in the pass after.

Cost: each consumer keeps its bits packed as KVM does (a uint64 word per 64 pages) with the list of words
touched since its last take, so a read of KVM costs KVM's copy of the bitmap (RAM/32768 bytes) and one C-speed
scan of it, then work in proportion to the words written, and `take_pfns` costs the pages written since the
previous take: free page hinting takes before every 4 MiB hint (`take_pfns_claiming`, which with manual
protection also clears the hint's own pages in KVM after the read). KVM copies a memslot's whole bitmap at
each KVM_GET_DIRTY_LOG (there is no read of a range), so that copy is the one part that grows with RAM.
`take_mask` answers a bool per page of RAM (migration, once per pass).

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

from memvisor.kvm import ioctls, structs
from memvisor.vmm.dirty_log import PAGE_SHIFT, DirtyLogVm, bitmap_bytes, set_dirty_logging

PAGE_SIZE = 1 << PAGE_SHIFT

if TYPE_CHECKING:
    import numpy as np

    from memvisor.kvm.system import MemorySlot

SlotFilter = Callable[["MemorySlot"], bool]


class DirtyConsumer:
    """One consumer's own view of the dirty pages, filled by the tracker: a bit per guest PFN, packed in uint64
    words as KVM packs its bitmap (bit i of word j: PFN 64*j + i), and the words touched since the last take.

    The touched words make a take cost in proportion to the writes, not to RAM: a free page hint takes before
    each 4 MiB hint. When more words were touched than a quarter of the bitmap (a memslot handed out whole,
    a huge `mark`, many reads without a take) the next take scans all words instead (C speed, RAM/32768 bytes).
    """

    def __init__(self, tracker: DirtyTracker, name: str, limit: int) -> None:
        import numpy as np

        self.name = name
        self._tracker = tracker
        self.limit = limit  # one past the highest PFN tracked
        self.words = np.zeros(-(-limit // 64), dtype=np.uint64)
        self._touched: list[np.ndarray] = []  # word indices that may be non-zero (repeats allowed)
        self._touched_count = 0
        self._scan_all = False  # too much touched: the next take scans every word
        self.marked = False  # any bit set since the last take (a take of nothing then costs no scan)
        self.closed = False
        self.manual = False  # subscribed with manual=True: it promises to `clear` what it reads

    def _grow(self, limit: int) -> None:
        import numpy as np

        if limit > self.limit:
            grown = np.zeros(-(-limit // 64), dtype=np.uint64)
            grown[: self.words.size] = self.words
            self.words = grown
            self.limit = limit

    def _touch(self, indices: np.ndarray) -> None:
        """Words `indices` may have bits set now (call under the tracker's lock)."""
        self.marked = True
        if self._scan_all:
            return
        self._touched.append(indices)
        self._touched_count += indices.size
        if self._touched_count > self.words.size // 4:
            self._scan_all = True
            self._touched = []
            self._touched_count = 0

    def _or_words(self, first_word: int, nonzero: np.ndarray, values: np.ndarray) -> None:
        """OR `values` into words `first_word + nonzero` (unique indices)."""
        indices = nonzero + first_word
        self.words[indices] |= values
        self._touch(indices)

    def _set_pages(self, first: int, end: int) -> None:
        """Set the bits of PFNs [first, end) (clipped to the tracked PFNs), a word at a time."""
        import numpy as np

        first, end = max(first, 0), min(end, self.limit)
        if end <= first:
            return
        low, high = first >> 6, (end - 1) >> 6
        head = np.uint64((0xFFFFFFFFFFFFFFFF << (first & 63)) & 0xFFFFFFFFFFFFFFFF)
        tail = np.uint64(0xFFFFFFFFFFFFFFFF >> (63 - ((end - 1) & 63)))
        if low == high:
            self.words[low] |= head & tail
        else:
            self.words[low] |= head
            self.words[low + 1 : high] = np.uint64(0xFFFFFFFFFFFFFFFF)
            self.words[high] |= tail
        self._touch(np.arange(low, high + 1, dtype=np.int64))

    def _reset(self) -> None:
        self._touched = []
        self._touched_count = 0
        self._scan_all = False
        self.marked = False

    def take_mask(self) -> np.ndarray:
        """The pages written since this consumer's previous take (or its subscription), a bool array by guest
        PFN; clears them. The array is a bool per page of RAM (migration takes once per pass), filled in
        proportion to the writes."""
        import numpy as np

        with self._tracker.lock:
            self._tracker.sync_locked()
            mask = np.zeros(self.words.size * 64, dtype=bool)  # calloc: pages of zeros cost nothing until written
            indices, values = self._take_words_locked()
            if indices.size:
                mask.reshape(-1, 64)[indices] = _unpack_words(values)
            return mask[: self.limit]

    def take_pfns(self) -> np.ndarray:
        """`take_mask()` as a sorted int64 array of guest PFNs, at a cost that follows the pages written since
        the previous take (plus KVM's copy of its bitmap), not the RAM."""
        with self._tracker.lock:
            self._tracker.sync_locked()
            return self._take_pfns_locked()

    def take_pfns_claiming(self, first_pfn: int, count: int) -> np.ndarray:
        """`take_pfns()` for a consumer that from now on relies on the pages [first_pfn, first_pfn+count) being
        unwritten (a free page hint about to be recorded): with manual protection on, KVM's bits of those pages
        are also cleared (rounded out to 64 pages) right after the read, so their next write is logged anew and
        their older writes, already handed out here, do not come back at every later take. Every other
        consumer got the cleared bits from the same read (`DirtyTracker.clear`)."""
        with self._tracker.lock:
            tracker = self._tracker
            tracker.sync_locked()
            tracker.clear_locked(first_pfn << PAGE_SHIFT, count << PAGE_SHIFT)
            return self._take_pfns_locked()

    def _take_words_locked(self) -> tuple[np.ndarray, np.ndarray]:
        """The indices (ascending) and values of the non-zero words, cleared: the pages written since the
        previous take, found through the touched words (or a scan of every word once they overflowed)."""
        import numpy as np

        if not self.marked:
            indices = np.zeros(0, dtype=np.int64)
        elif self._scan_all:
            indices = np.flatnonzero(self.words != 0)
        else:
            indices = np.unique(np.concatenate(self._touched)) if self._touched else np.zeros(0, dtype=np.int64)
        values = self.words[indices]
        self.words[indices] = 0
        self._reset()
        keep = values != 0
        return indices[keep], values[keep]

    def _take_pfns_locked(self) -> np.ndarray:
        return _word_pfns(*self._take_words_locked())

    def forget(self, first_pfn: int, pages: np.ndarray) -> None:
        """Drop the bits of the pages `first_pfn + i` for which `pages[i]`: the consumer is about to read them
        and has cleared them in KVM since (`DirtyTracker.clear`); a later write is logged anew."""
        import numpy as np

        with self._tracker.lock:
            pages = np.asarray(pages, dtype=bool)[: max(self.limit - first_pfn, 0)]
            if first_pfn >= 0 and first_pfn % 64 == 0:  # whole words (migration's chunks): pack and AND
                packed = np.packbits(pages, bitorder="little")
                packed = np.concatenate([packed, np.zeros(-packed.size % 8, dtype=np.uint8)]).view(np.uint64)
                self.words[first_pfn >> 6 : (first_pfn >> 6) + packed.size] &= ~packed
                return
            pfns = np.flatnonzero(pages) + first_pfn
            pfns = pfns[pfns >= 0]
            if pfns.size:
                bits = np.left_shift(np.uint64(1), (pfns & 63).astype(np.uint64))
                np.bitwise_and.at(self.words, pfns >> 6, ~bits)

    def close(self) -> None:
        self._tracker.unsubscribe(self)


def _unpack_words(values: np.ndarray) -> np.ndarray:
    """uint64 words as a bool array of shape (words, 64): [j, i] is bit i of word j (KVM's order)."""
    import numpy as np

    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little").view(bool)


def _word_pfns(indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The PFNs of the set bits of words `values` at word indices `indices` (sorted ascending), sorted."""
    import numpy as np

    if not indices.size:
        return np.zeros(0, dtype=np.int64)
    rows, cols = np.nonzero(_unpack_words(values))
    return indices[rows].astype(np.int64) * 64 + cols


class DirtyTracker:
    """KVM dirty logging on the memslots `include` accepts, shared by any number of consumers (thread-safe)."""

    def __init__(self, vm: DirtyLogVm, include: SlotFilter) -> None:
        self._vm = vm
        self._include = include
        self.lock = threading.RLock()
        self._consumers: list[DirtyConsumer] = []
        self._logged: dict[int, tuple[int, int]] = {}  # slot -> (gpa, size) registered with logging on
        self._buffers: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.manual = False  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled by this tracker

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

    def subscribe(self, name: str, *, manual: bool = False) -> DirtyConsumer:
        """A new consumer; it sees the writes from now on. The first one turns KVM's logging on. With `manual`,
        manual protection goes on if KVM has it (`consumer.manual` says whether it did): the consumer must then
        `clear` every page range before it reads it, each time it reads it."""
        with self.lock:
            if self._consumers:
                self.sync_locked()  # writes before this consumer belong to the others only
            consumer = DirtyConsumer(self, name, self.pfn_limit)
            self._consumers.append(consumer)
            if len(self._consumers) == 1:
                self._arm_new_slots(mark=False)
            if manual:
                self._set_manual(True)
                consumer.manual = self.manual
            return consumer

    def _set_manual(self, on: bool) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on or off (off: the next KVM_GET_DIRTY_LOG hands out and clears
        every bit still set, as before). Without the capability the tracker stays in KVM's own mode."""
        if on == self.manual:
            return
        enable = getattr(self._vm, "enable_cap", None)
        check = getattr(self._vm, "check_extension", None)
        if enable is None or check is None:
            return
        try:
            if on and not check(ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                return
            enable(ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, structs.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE if on else 0)
        except OSError:  # KvmIoctlError: an older KVM; the tracker keeps KVM_GET_DIRTY_LOG's own clearing
            return
        self.manual = on

    def clear(self, gpa: int, size: int) -> None:
        """Manual protection: read KVM (every consumer gets every bit), then clear and write-protect again the
        pages of [gpa, gpa+size) whose bits that read found (rounded out to 64 pages, KVM's unit), so the
        next write to any of them is logged. A no-op in KVM's own mode."""
        with self.lock:
            if not self.manual or size <= 0:
                return
            self.sync_locked()
            self.clear_locked(gpa, size)

    def clear_locked(self, gpa: int, size: int) -> None:
        """`clear` without its read of KVM: the caller read it (`sync_locked`) under the lock just before, so
        the bitmaps cleared are the ones every consumer got. A no-op in KVM's own mode."""
        if self.manual and size > 0:
            for info in self._slots():
                buffer = self._buffers.get(info.slot)
                pages = info.size >> PAGE_SHIFT
                start = (max(gpa, info.guest_phys_addr) - info.guest_phys_addr) >> PAGE_SHIFT
                end = (min(gpa + size, info.guest_phys_addr + info.size) - info.guest_phys_addr + PAGE_SIZE - 1) >> PAGE_SHIFT
                if buffer is None or end <= start:
                    continue
                first = start // 64 * 64
                count = min(-(-end // 64) * 64, pages) - first
                view = (ctypes.c_char * bitmap_bytes(count)).from_buffer(buffer, first // 8)
                self._vm.clear_dirty_log(info.slot, first, count, view)  # type: ignore[attr-defined]

    def unsubscribe(self, consumer: DirtyConsumer) -> None:
        """Drop `consumer`; the last one turns KVM's logging off (a no-op for one already gone)."""
        with self.lock:
            if consumer not in self._consumers:
                return
            self._consumers.remove(consumer)
            consumer.closed = True
            if consumer.manual and not any(other.manual for other in self._consumers):
                self._set_manual(False)
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
                    consumer._set_pages(first, first + (info.size >> PAGE_SHIFT))
        for slot in [slot for slot in self._logged if slot not in self._vm.slots]:
            del self._logged[slot]
            self._buffers.pop(slot, None)

    def sync_locked(self) -> None:
        """Read KVM's bitmaps of every tracked memslot and OR them into every consumer (call under `lock`).

        Per memslot: KVM's copy of its bitmap (RAM/32768 bytes), one scan of it for non-zero words at C speed,
        then work in proportion to the words written."""
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
            nonzero = np.flatnonzero(words != 0)  # 4x faster than on the words themselves
            if not nonzero.size:
                continue
            values = words[nonzero]
            pages = info.size >> PAGE_SHIFT
            if nonzero[-1] == pages >> 6 and pages & 63:  # bits past the slot's end (KVM never sets them)
                values[-1] &= np.uint64((1 << (pages & 63)) - 1)
            base = info.guest_phys_addr >> PAGE_SHIFT
            if base & 63:  # a memslot not on a 256 KiB boundary: bit by bit
                pfns = _word_pfns(nonzero, values) + base
                for consumer in self._consumers:
                    bits = np.left_shift(np.uint64(1), (pfns & 63).astype(np.uint64))
                    np.bitwise_or.at(consumer.words, pfns >> 6, bits)
                    consumer._touch(np.unique(pfns >> 6))
                continue
            for consumer in self._consumers:
                consumer._or_words(base >> 6, nonzero, values)

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
                consumer._set_pages(first, end)
