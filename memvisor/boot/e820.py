"""The BIOS e820 memory map handed to Linux in boot_params (arch/x86/include/uapi/asm/e820.h... bootparam.h)."""

import struct
from dataclasses import dataclass

from memvisor.boot import layout

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128
# struct boot_e820_entry { __u64 addr; __u64 size; __u32 type; } __packed
E820_ENTRY = struct.Struct("<QQI")


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    def pack(self) -> bytes:
        return E820_ENTRY.pack(self.addr, self.size, self.type)


def build_e820(memory_size: int) -> list[E820Entry]:
    """The map for `memory_size` bytes of RAM laid out by layout.ram_ranges."""
    entries = [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START, E820_RESERVED),
    ]
    for gpa, size in layout.ram_ranges(memory_size):
        start = max(gpa, layout.HIGH_MEMORY_START)
        if gpa + size > start:
            entries.append(E820Entry(start, gpa + size - start, E820_RAM))
    return entries
