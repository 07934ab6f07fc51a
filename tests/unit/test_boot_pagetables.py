"""The boot page tables (PML4 -> PDPT -> PD of 2 MiB pages) and the boot GDT, decoded bit by bit.

Entry formats: Intel SDM vol. 3A 4.5 (IA-32e paging, tables 4-15 to 4-18); segment descriptors: 3.4.5,
system descriptors 3.5 and 7.2.2 (TSS).
"""

import struct

import pytest

from memvisor.boot import layout, pagetables

P, RW, PS = 1 << 0, 1 << 1, 1 << 7
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000


def _entries(page: bytes) -> list[int]:
    assert len(page) == 4096
    return list(struct.unpack("<512Q", page))


def _walk(tables: dict[int, bytes], virtual: int) -> int | None:
    """Translate `virtual` through the tables as the CPU would in 4-level paging; None if not present."""
    pml4 = _entries(tables[layout.PML4_ADDR])[(virtual >> 39) & 0x1FF]
    if not pml4 & P:
        return None
    pdpt = _entries(tables[pml4 & ADDRESS_MASK])[(virtual >> 30) & 0x1FF]
    if not pdpt & P:
        return None
    assert not pdpt & PS, "no 1 GiB pages expected"
    pde = _entries(tables[pdpt & ADDRESS_MASK])[(virtual >> 21) & 0x1FF]
    if not pde & P:
        return None
    assert pde & PS, "the page directory maps 2 MiB pages"
    return (pde & 0x000F_FFFF_FFE0_0000) | (virtual & 0x1F_FFFF)


def test_tables_are_three_pages_at_their_addresses() -> None:
    tables = pagetables.build_page_tables()
    assert set(tables) == {layout.PML4_ADDR, layout.PDPT_ADDR, layout.PD_ADDR}
    assert all(address % 4096 == 0 and len(page) == 4096 for address, page in tables.items())


def test_pml4_and_pdpt_have_one_entry_each() -> None:
    tables = pagetables.build_page_tables()
    pml4 = _entries(tables[layout.PML4_ADDR])
    pdpt = _entries(tables[layout.PDPT_ADDR])
    assert pml4[0] == layout.PDPT_ADDR | P | RW
    assert pdpt[0] == layout.PD_ADDR | P | RW
    assert pml4[1:] == [0] * 511
    assert pdpt[1:] == [0] * 511


def test_page_directory_identity_maps_the_first_gigabyte_with_2m_pages() -> None:
    pd = _entries(pagetables.build_page_tables()[layout.PD_ADDR])
    for index, entry in enumerate(pd):
        assert entry & (P | RW | PS) == P | RW | PS
        assert entry & ~0xFFF == index << 21
        assert entry & 0xFFF & ~(P | RW | PS) == 0  # no user, PWT, PCD, global or NX bits


@pytest.mark.parametrize(
    "address",
    [0, layout.GDT_ADDR, layout.ZERO_PAGE_ADDR, layout.BOOT_STACK_TOP - 8, layout.CMDLINE_ADDR,
     layout.KERNEL_LOAD_ADDR, layout.KERNEL_LOAD_ADDR + 0x3000000, (1 << 30) - 1],
)  # fmt: skip
def test_walk_is_identity(address: int) -> None:
    assert _walk(pagetables.build_page_tables(), address) == address


@pytest.mark.parametrize("address", [1 << 30, 0xC000_0000, 1 << 39, 0xFFFF_8000_0000_0000])
def test_nothing_else_is_mapped(address: int) -> None:
    assert _walk(pagetables.build_page_tables(), address) is None


def _decode(descriptor: int) -> dict[str, int]:
    """A segment descriptor's fields (SDM 3.4.5, figure 3-8)."""
    return {
        "limit": (descriptor & 0xFFFF) | ((descriptor >> 48) & 0xF) << 16,
        "base": ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 56) & 0xFF) << 24,
        "type": (descriptor >> 40) & 0xF,
        "s": (descriptor >> 44) & 1,
        "dpl": (descriptor >> 45) & 3,
        "p": (descriptor >> 47) & 1,
        "avl": (descriptor >> 52) & 1,
        "l": (descriptor >> 53) & 1,
        "db": (descriptor >> 54) & 1,
        "g": (descriptor >> 55) & 1,
    }


def _gdt() -> list[int]:
    raw = pagetables.build_gdt()
    assert len(raw) % 8 == 0
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


def test_gdt_null_descriptor() -> None:
    assert _gdt()[0] == 0


def test_gdt_code_segment_is_64_bit() -> None:
    code = _decode(_gdt()[pagetables.CODE_SELECTOR // 8])
    assert code["p"] == 1 and code["s"] == 1 and code["dpl"] == 0
    assert code["type"] & 0x8, "executable"
    assert code["type"] & 0x2, "readable"
    assert code["l"] == 1 and code["db"] == 0  # 64-bit code requires D = 0 when L = 1
    assert code["g"] == 1 and code["limit"] == 0xFFFFF and code["base"] == 0


def test_gdt_data_segment() -> None:
    data = _decode(_gdt()[pagetables.DATA_SELECTOR // 8])
    assert data["p"] == 1 and data["s"] == 1 and data["dpl"] == 0
    assert not data["type"] & 0x8, "data, not code"
    assert data["type"] & 0x2, "writable"
    assert data["db"] == 1 and data["l"] == 0
    assert data["g"] == 1 and data["limit"] == 0xFFFFF and data["base"] == 0


def test_gdt_tss_descriptor() -> None:
    tss = _decode(_gdt()[pagetables.TSS_SELECTOR // 8])
    assert tss["p"] == 1
    assert tss["s"] == 0, "a system descriptor"
    assert tss["type"] == 0xB, "busy 32/64-bit TSS (what VM entry requires of TR)"


def test_selectors_index_the_gdt() -> None:
    count = len(_gdt())
    for selector in (pagetables.CODE_SELECTOR, pagetables.DATA_SELECTOR, pagetables.TSS_SELECTOR):
        assert selector % 8 == 0 and 0 < selector // 8 < count  # GDT, RPL 0, not the null descriptor
    assert layout.GDT_ADDR + 8 * count <= layout.IDT_ADDR
