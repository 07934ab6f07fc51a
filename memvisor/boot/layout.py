"""Where things live in guest physical memory and port space.

0x0000_0500  GDT (boot segments)              0x0000_7000  zero page (struct boot_params)
0x0000_8ff0  boot stack top                   0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map, 1 GiB)
0x0002_0000  kernel command line              0x0009_fc00 .. 0x0010_0000  reserved (EBDA, ROM area)
0x000e_0000  ACPI tables (RSDP first)         0x0100_0000  the kernel (pref_address of the 6.1 bzImage)
RAM up to 0xc000_0000, then the 32-bit MMIO hole, then the rest of RAM from 4 GiB.
0xd000_0000  virtio-mmio slots, 0x1000 each   0xfec0_0000  IOAPIC   0xfee0_0000  local APICs
"""

GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
HIGH_MEMORY_START = 0x100000
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_END = 0x100000
KERNEL_LOAD_ADDR = 0x1000000

MMIO_HOLE_START = 0xC000_0000
FOUR_GIB = 0x1_0000_0000
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SLOT_SIZE = 0x1000
VIRTIO_MMIO_SLOTS = 8
VIRTIO_MMIO_FIRST_GSI = 16
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
TSS_ADDR = 0xFFFB_D000

# Legacy ports and their interrupt lines.
COM1_PORT, COM1_GSI = 0x3F8, 4
COM2_PORT, COM2_GSI = 0x2F8, 3
RTC_PORT = 0x70
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
# ACPI hardware-reduced sleep control/status and reset registers (FADT), 1 byte each.
ACPI_SLEEP_CONTROL_PORT = 0x600
ACPI_SLEEP_STATUS_PORT = 0x601
ACPI_RESET_PORT = 0x602
ACPI_RESET_VALUE = 0x1
ACPI_S5_SLEEP_TYPE = 5

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(base address, GSI) of virtio-mmio slot `index`."""
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_FIRST_GSI + index


def ram_ranges(memory_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (gpa, size) ranges: below the 32-bit MMIO hole, then the rest from 4 GiB."""
    low = min(memory_size, MMIO_HOLE_START)
    ranges = [(0, low)]
    if memory_size > low:
        ranges.append((FOUR_GIB, memory_size - low))
    return ranges
