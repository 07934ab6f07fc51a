"""The zero page: struct boot_params (arch/x86/include/uapi/asm/bootparam.h, Documentation/x86/zero-page.rst)."""

import struct

from memvisor.boot.e820 import E820_ENTRY, E820_MAX_ENTRIES_ZEROPAGE, E820Entry

BOOT_PARAMS_SIZE = 4096
# Offsets in struct boot_params.
SETUP_HEADER_OFFSET = 0x1F1  # struct setup_header hdr, where a bzImage has it too (bzimage.py)
ACPI_RSDP_ADDR = 0x070  # __u64
EXT_RAMDISK_IMAGE = 0x0C0  # __u32
EXT_RAMDISK_SIZE = 0x0C4  # __u32
EXT_CMD_LINE_PTR = 0x0C8  # __u32
E820_ENTRIES = 0x1E8  # __u8
E820_TABLE = 0x2D0  # struct boot_e820_entry[128]
# Offsets of setup header fields the loader writes.
TYPE_OF_LOADER = 0x210  # __u8
LOADFLAGS = 0x211  # __u8
RAMDISK_IMAGE = 0x218  # __u32
RAMDISK_SIZE = 0x21C  # __u32
HEAP_END_PTR = 0x224  # __u16
CMD_LINE_PTR = 0x228  # __u32
VID_MODE = 0x1FA  # __u16

LOADER_UNDEFINED = 0xFF
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
VID_MODE_NORMAL = 0xFFFF


def build_zero_page(
    setup_header: bytes,
    *,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    e820: list[E820Entry],
    rsdp_addr: int,
) -> bytes:
    """The 4 KiB boot_params for a 64-bit boot of the kernel whose setup header (from offset 0x1f1) is given."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError("too many e820 entries for the zero page")
    page = bytearray(BOOT_PARAMS_SIZE)
    page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(setup_header)] = setup_header
    struct.pack_into("<H", page, VID_MODE, VID_MODE_NORMAL)
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", page, CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", page, RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", page, EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, rsdp_addr)
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        E820_ENTRY.pack_into(page, E820_TABLE + index * E820_ENTRY.size, entry.addr, entry.size, entry.type)
    return bytes(page)
