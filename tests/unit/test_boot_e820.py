"""Guest RAM layout (layout.ram_ranges) and the e820 map Linux gets, for small and large guests."""

import pytest

from memvisor.boot import layout
from memvisor.boot.e820 import E820_RAM, E820_RESERVED, E820Entry, build_e820

MIB, GIB = 1 << 20, 1 << 30
SIZES = [
    128 * MIB,
    256 * MIB,
    2 * GIB,
    3 * GIB - 2 * MIB,
    3 * GIB,
    3 * GIB + 2 * MIB,
    4 * GIB,
    6 * GIB,
    64 * GIB,
]


def _ram(entries: list[E820Entry]) -> list[tuple[int, int]]:
    return [(e.addr, e.addr + e.size) for e in entries if e.type == E820_RAM]


@pytest.mark.parametrize("size", SIZES)
def test_ram_ranges_cover_memory_around_the_hole(size: int) -> None:
    ranges = layout.ram_ranges(size)
    assert sum(length for _, length in ranges) == size
    assert ranges[0][0] == 0
    for gpa, length in ranges:
        assert length > 0
        end = gpa + length
        assert end <= layout.MMIO_HOLE_START or gpa >= layout.FOUR_GIB  # never in the 32-bit hole
    if size > layout.MMIO_HOLE_START:
        assert ranges == [(0, layout.MMIO_HOLE_START), (layout.FOUR_GIB, size - layout.MMIO_HOLE_START)]
    else:
        assert ranges == [(0, size)]


@pytest.mark.parametrize("size", SIZES)
def test_e820_sorted_disjoint_and_complete(size: int) -> None:
    entries = build_e820(size)
    spans = [(e.addr, e.addr + e.size) for e in entries]
    assert spans == sorted(spans)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, "e820 entries overlap"
    assert all(e.size > 0 and e.type in (E820_RAM, E820_RESERVED) for e in entries)
    reserved = [(e.addr, e.addr + e.size) for e in entries if e.type == E820_RESERVED]
    assert reserved == [(0x9FC00, 0x100000)]
    # All RAM is reported except what the legacy reserved area takes out of the first MiB.
    assert sum(end - start for start, end in _ram(entries)) == size - (0x100000 - 0x9FC00)


def test_e820_256m() -> None:
    assert _ram(build_e820(256 * MIB)) == [(0, 0x9FC00), (0x100000, 256 * MIB)]


def test_e820_2g() -> None:
    assert _ram(build_e820(2 * GIB)) == [(0, 0x9FC00), (0x100000, 2 * GIB)]


def test_e820_3g_fills_low_memory_up_to_the_hole() -> None:
    assert _ram(build_e820(3 * GIB)) == [(0, 0x9FC00), (0x100000, 0xC000_0000)]


def test_e820_4g_puts_the_last_gigabyte_above_4g() -> None:
    assert _ram(build_e820(4 * GIB)) == [(0, 0x9FC00), (0x100000, 3 * GIB), (4 * GIB, 5 * GIB)]


def test_e820_6g() -> None:
    assert _ram(build_e820(6 * GIB)) == [(0, 0x9FC00), (0x100000, 3 * GIB), (4 * GIB, 7 * GIB)]


@pytest.mark.parametrize("size", SIZES)
def test_mmio_and_boot_structures_are_not_ram(size: int) -> None:
    ram = _ram(build_e820(size))

    def in_ram(address: int) -> bool:
        return any(start <= address < end for start, end in ram)

    for address in (
        layout.VIRTIO_MMIO_BASE,
        layout.virtio_mmio_slot(layout.VIRTIO_MMIO_SLOTS - 1)[0],
        layout.IOAPIC_ADDR,
        layout.LAPIC_ADDR,
        layout.TSS_ADDR,
        layout.ACPI_TABLES_ADDR,  # the kernel must not reuse the ACPI tables as RAM
        layout.ACPI_TABLES_END - 1,
    ):
        assert not in_ram(address), hex(address)
    for address in (layout.ZERO_PAGE_ADDR, layout.PML4_ADDR, layout.CMDLINE_ADDR, layout.KERNEL_LOAD_ADDR):
        assert in_ram(address), hex(address)


def test_boot_structures_do_not_overlap() -> None:
    regions = {
        "gdt": (layout.GDT_ADDR, 4 * 8),
        "idt": (layout.IDT_ADDR, 8),
        "zero page": (layout.ZERO_PAGE_ADDR, 4096),
        "stack": (layout.BOOT_STACK_TOP - 0xC00, 0xC00),  # 3 KiB is plenty before Linux sets its own
        "pml4": (layout.PML4_ADDR, 4096),
        "pdpt": (layout.PDPT_ADDR, 4096),
        "pd": (layout.PD_ADDR, 4096),
        "cmdline": (layout.CMDLINE_ADDR, layout.CMDLINE_MAX),
        "acpi": (layout.ACPI_TABLES_ADDR, layout.ACPI_TABLES_END - layout.ACPI_TABLES_ADDR),
    }
    spans = sorted((start, start + size, name) for name, (start, size) in regions.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"{first} overlaps {second}"
    assert spans[-1][1] <= layout.HIGH_MEMORY_START <= layout.KERNEL_LOAD_ADDR


def test_virtio_mmio_slots() -> None:
    slots = [layout.virtio_mmio_slot(i) for i in range(layout.VIRTIO_MMIO_SLOTS)]
    assert slots[0] == (0xD000_0000, 16)
    bases = [base for base, _ in slots]
    gsis = [gsi for _, gsi in slots]
    assert bases == [0xD000_0000 + 0x1000 * i for i in range(layout.VIRTIO_MMIO_SLOTS)]
    assert len(set(gsis)) == len(gsis) and max(gsis) < 24  # the IOAPIC has 24 pins
    assert all(base >= layout.MMIO_HOLE_START and base + 0x1000 <= layout.IOAPIC_ADDR for base in bases)
    assert {layout.COM1_GSI, layout.COM2_GSI, 0, 2}.isdisjoint(gsis)


def test_entry_pack_is_the_boot_e820_entry_layout() -> None:
    packed = E820Entry(0x1_0000_0000, 0x4000_0000, E820_RAM).pack()
    assert packed == bytes.fromhex("0000000001000000000000400000000001000000")
