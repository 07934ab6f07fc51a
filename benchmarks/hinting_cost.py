"""What free page hinting costs per hint as guest RAM grows: the writes logged since the last hint, applied.

No KVM needed (runs anywhere):
    .venv/bin/python benchmarks/hinting_cost.py [--sizes 1G,16G] [--hints 30]

Before recording each hint the balloon clears, from its hint bitmap, the pages the guest wrote since the
previous one. The written pages come from the dirty tracker (memvisor/vmm/dirty_tracker.py) either as PFNs
(`take_pfns`, what the device uses) or as a bool per page of RAM (`take_mask`, the earlier way). A fake KVM VM
hands out its dirty bitmap at C speed (numpy), as KVM's copy does, so the numbers are memvisor's side plus one
bitmap copy of RAM/32768 bytes. Prints the median milliseconds per hint for each size and way. The goal is a
cost that follows the hint, not the RAM; on the fake, the bitmap copy itself grows with RAM, as KVM's does.
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
    """One memslot and the pages written in it; get_dirty_log copies KVM's bitmap layout at C speed."""

    def __init__(self, size: int) -> None:
        self.slots = {0: MemorySlot(0, 0, size, 0x7F0000000000, 0)}
        self.written: set[int] = set()

    def set_memory_slot(self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0) -> None:
        self.slots[slot] = MemorySlot(slot, gpa, size, userspace_addr, flags)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        assert self.slots[slot].flags & structs.KVM_MEM_LOG_DIRTY_PAGES
        words = np.zeros(-(-(self.slots[slot].size >> 12) // 64), dtype=np.uint64)
        for page in self.written:
            words[page // 64] |= np.uint64(1 << (page % 64))
        data = words.tobytes()
        ctypes.memmove(bitmap, data, len(data))
        self.written = set()

    def write(self, gpa: int) -> None:
        self.written.add(gpa >> 12)


def per_hint_seconds(ram: int, hints: int, *, by_pfn: bool) -> float:
    vm = FastFakeVm(ram)
    log = DirtyTracker(vm, lambda slot: True).subscribe("hinting")
    bitmap = PageBitmap(ram >> 12)
    bitmap.set_run(0, 1024)
    times = []
    for i in range(hints):
        vm.write((i * 4096 * 7) % ram)  # a few writes between hints
        started = time.perf_counter()
        bitmap.clear_dirty(log.take_pfns() if by_pfn else log.take_mask())
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1G,16G", help="guest RAM sizes, comma-separated (default 1G,16G)")
    parser.add_argument("--hints", type=int, default=30, help="hints timed per size and way (default 30)")
    args = parser.parse_args()
    try:
        sizes = [parse_size(text) for text in args.sizes.split(",")]
    except UsageError as error:
        parser.error(f"--sizes: {error}")
    print("| guest RAM | by PFN (ms per hint) | by mask (ms per hint) |")
    print("|---|---|---|")
    for size in sizes:
        pfn = per_hint_seconds(size, args.hints, by_pfn=True)
        mask = per_hint_seconds(size, args.hints, by_pfn=False)
        print(f"| {size >> 20} MiB | {pfn * 1e3:.2f} | {mask * 1e3:.2f} |")


if __name__ == "__main__":
    main()
