"""What free page hinting costs per hint as guest RAM grows: the writes logged since the last hint, applied.

No KVM needed (runs anywhere):
    .venv/bin/python benchmarks/hinting_cost.py [--sizes 1G,16G] [--hints 30]
    MEMVISOR_TREE=/path/to/other/checkout .venv/bin/python benchmarks/hinting_cost.py   # an older tree

Before recording each hint the balloon clears, from its hint bitmap, the pages the guest wrote since the
previous one, then records the hint. The written pages come from the dirty tracker
(memvisor/vmm/dirty_tracker.py): as PFNs (`take_pfns_claiming(first, count)`, what the device asks through the
Machine's `dirty_pfns`; `take_pfns` on a tree without it) or as a bool per page of RAM (`take_mask`, the
earliest way). A fake KVM VM keeps its dirty bitmap as KVM does (one bit per page) and hands it out with one
copy and one clear at C speed, as KVM_GET_DIRTY_LOG does; its own cost is printed apart ("KVM copy"): it grows
with RAM (RAM/32768 bytes), as KVM's does, and is the part memvisor cannot shrink (KVM copies a memslot's
whole bitmap). Prints the median milliseconds per hint for each size and way.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.environ.get("MEMVISOR_TREE") or str(Path(__file__).resolve().parents[1]))

from memvisor.devices.balloon.pages import PageBitmap  # noqa: E402
from memvisor.errors import UsageError  # noqa: E402
from memvisor.kvm import structs  # noqa: E402
from memvisor.kvm.system import MemorySlot  # noqa: E402
from memvisor.units import parse_size  # noqa: E402
from memvisor.vmm.dirty_tracker import DirtyTracker  # noqa: E402


class FastFakeVm:
    """One memslot and its dirty bitmap; get_dirty_log copies it out and clears it at C speed, as KVM does."""

    def __init__(self, size: int) -> None:
        self.slots = {0: MemorySlot(0, 0, size, 0x7F0000000000, 0)}
        self.words = np.zeros(-(-(size >> 12) // 64), dtype=np.uint64)
        self.copy_seconds: list[float] = []

    def set_memory_slot(self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0) -> None:
        self.slots[slot] = MemorySlot(slot, gpa, size, userspace_addr, flags)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        assert self.slots[slot].flags & structs.KVM_MEM_LOG_DIRTY_PAGES
        started = time.perf_counter()
        ctypes.memmove(bitmap, self.words.ctypes.data, self.words.nbytes)
        self.words[:] = 0
        self.copy_seconds.append(time.perf_counter() - started)

    def write(self, gpa: int) -> None:
        page = gpa >> 12
        self.words[page // 64] |= np.uint64(1 << (page % 64))


def per_hint_seconds(ram: int, hints: int, *, by_pfn: bool) -> tuple[float, float]:
    """The median seconds per hint (write a few pages, apply the log, record a 4 MiB hint), and of the fake
    KVM's copy within it."""
    vm = FastFakeVm(ram)
    log = DirtyTracker(vm, lambda slot: True).subscribe("hinting")
    claiming = getattr(log, "take_pfns_claiming", None)
    bitmap = PageBitmap(ram >> 12)
    times, copies = [], []
    for i in range(hints):
        for page in range(4):  # a few writes between hints, spread over RAM
            vm.write((i * 4096 * 7 + page * (ram // 4)) % ram)
        first = (i * 1024) % (ram >> 12)
        vm.copy_seconds.clear()
        started = time.perf_counter()
        if not by_pfn:
            bitmap.clear_dirty(log.take_mask())
        elif claiming is not None:
            bitmap.clear_dirty(claiming(first, 1024))
        else:
            bitmap.clear_dirty(log.take_pfns())
        bitmap.set_run(first, 1024)
        times.append(time.perf_counter() - started)
        copies.append(sum(vm.copy_seconds))
    return sorted(times)[len(times) // 2], sorted(copies)[len(copies) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1G,16G", help="guest RAM sizes, comma-separated (default 1G,16G)")
    parser.add_argument("--hints", type=int, default=30, help="hints timed per size and way (default 30)")
    args = parser.parse_args()
    try:
        sizes = [parse_size(text) for text in args.sizes.split(",")]
    except UsageError as error:
        parser.error(f"--sizes: {error}")
    print("| guest RAM | by PFN (ms per hint) | by mask (ms per hint) | of which the fake KVM copy (ms) |")
    print("|---|---|---|---|")
    for size in sizes:
        pfn, copy = per_hint_seconds(size, args.hints, by_pfn=True)
        mask, _ = per_hint_seconds(size, args.hints, by_pfn=False)
        print(f"| {size >> 20} MiB | {pfn * 1e3:.3f} | {mask * 1e3:.2f} | {copy * 1e3:.3f} |")

if __name__ == "__main__":
    main()
