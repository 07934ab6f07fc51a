"""Identity-mapped long-mode page tables and the boot GDT (what a 64-bit direct boot needs).

Linux's 64-bit entry (Documentation/x86/boot.rst, "64-bit Boot Protocol") wants long mode with the kernel,
boot_params and command line identity-mapped; its own tables take over within microseconds. One PML4 entry,
one PDPT entry and 512 2 MiB pages map the first 1 GiB.
"""

import struct

from memvisor.boot import layout

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7  # PS bit in a page directory entry: a 2 MiB page

# GDT descriptors (Intel SDM 3.3.4.5): null, 64-bit code, data, 32-bit TSS.
GDT_ENTRIES = (
    0x0000_0000_0000_0000,
    0x00AF_9B00_0000_FFFF,  # code: present, DPL 0, execute/read, L=1, G=1
    0x00CF_9300_0000_FFFF,  # data: present, DPL 0, read/write, D/B=1, G=1
    0x008F_8B00_0000_FFFF,  # TSS: present, busy 32-bit TSS
)
CODE_SELECTOR = 1 * 8
DATA_SELECTOR = 2 * 8
TSS_SELECTOR = 3 * 8


def build_page_tables() -> dict[int, bytes]:
    """{gpa: bytes} for the PML4, PDPT and PD that identity-map the first 1 GiB with 2 MiB pages."""
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE).ljust(layout.PAGE_SIZE, b"\0")
    pdpt = struct.pack("<Q", layout.PD_ADDR | PTE_PRESENT | PTE_WRITABLE).ljust(layout.PAGE_SIZE, b"\0")
    pd = b"".join(
        struct.pack("<Q", (index << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE) for index in range(512)
    )
    return {layout.PML4_ADDR: pml4, layout.PDPT_ADDR: pdpt, layout.PD_ADDR: pd}


def build_gdt() -> bytes:
    return b"".join(struct.pack("<Q", entry) for entry in GDT_ENTRIES)
