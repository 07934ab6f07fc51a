"""The page walk after a triple fault (memvisor/vmm/page_walk.py) over hand-built x86-64 page tables in guest memory:
present and not present at each level, a zeroed table page, CR3 and entries outside guest RAM, 2M and 1G pages,
5-level paging, the IDT's #PF/#DF gates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.vmm import page_walk
from memvisor.vmm.page_walk import Gate, Walk, describe, paging_levels, walk

MiB = 1 << 20
RAM = 64 * MiB
CR0, CR4, EFER = 0x80050033, 0x3506F0, 0xD01  # what Linux runs with: PG, PAE, LMA (no LA57)
CR4_LA57 = CR4 | 1 << 12
TEXT = 0xFFFFFFFF81A2B3C4  # kernel text: PML4 511, PDPT 510, PD 13, PT 0x2b
STACK = 0xFFFFC90000013E58  # vmalloc'd stack: PML4 402
IDT = 0xFFFFFE0000000000  # the cpu entry area
PRESENT_RW = 0x63  # present, writable, accessed, dirty
NX = 1 << 63


class Tables:
    """A bump allocator of table pages in guest RAM and mappings of 4K, 2M and 1G pages, 4- or 5-level."""

    def __init__(self, memory: GuestMemory, levels: int = 4) -> None:
        self.memory, self.levels = memory, levels
        self.next = 0x100000
        self.cr3 = self.page()

    def page(self) -> int:
        gpa, self.next = self.next, self.next + 4096
        return gpa

    def entry_at(self, table: int, linear: int, level: int) -> int:
        return table + ((linear >> (12 + 9 * (level - 1))) & 0x1FF) * 8

    def table_for(self, linear: int, down_to: int) -> list[int]:
        """The tables from the top level down to level `down_to`, made as needed; their GPAs, top first."""
        tables = [self.cr3]
        for level in range(self.levels, down_to, -1):
            at = self.entry_at(tables[-1], linear, level)
            entry = self.memory.read_u64(at)
            if not entry & 1:
                entry = self.page() | PRESENT_RW
                self.memory.write_u64(at, entry)
            tables.append(entry & page_walk.ADDRESS_MASK)
        return tables

    def map(self, linear: int, gpa: int, size: int = 4096) -> list[int]:
        level = {4096: 1, 2 * MiB: 2, 1 << 30: 3}[size]
        tables = self.table_for(linear, level)
        flags = PRESENT_RW | (0x80 | 0x1000 if level > 1 else 0)  # PS, and the PAT bit 12 of a huge entry
        self.memory.write_u64(self.entry_at(tables[-1], linear, level), gpa | flags | NX)
        return tables


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([MemoryRegion.memfd(0, RAM, "ram0")]) as mem:
        yield mem


def run(memory: GuestMemory, cr3: int, address: int, levels: int = 4) -> Walk:
    return walk(memory, cr3, address, levels)


def test_a_present_4k_mapping_names_every_table_and_the_gpa(memory: GuestMemory) -> None:
    t = Tables(memory)
    tables = t.map(TEXT & ~0xFFF, 0x2A00000)
    memory.write(0x2A00000 + 0x3C4, b"\x0f\x0b")
    result = run(memory, t.cr3, TEXT)
    assert result.gpa == 0x2A003C4 and result.page_zero is False
    assert [s.table for s in result.steps] == tables
    assert [s.level for s in result.steps] == [4, 3, 2, 1]
    assert [s.index for s in result.steps] == [511, 510, 13, 0x2B]
    assert all(s.present and s.table_zero is False for s in result.steps)
    assert result.steps[-1].entry == 0x2A00000 | PRESENT_RW | NX
    assert result.summary() == "maps to gpa 0x2a003c4"
    assert result.steps[0].describe() == f"PML4 table {t.cr3:#x} [511] = {memory.read_u64(t.cr3 + 511 * 8):#x} present"


def test_a_leaf_page_that_reads_zeros_is_said_so(memory: GuestMemory) -> None:
    t = Tables(memory)
    t.map(TEXT & ~0xFFF, 0x2A00000)
    assert run(memory, t.cr3, TEXT).summary() == "maps to gpa 0x2a003c4; that page reads ALL ZEROS (host page: hole)"
    memory.write(0x2A00000, bytes(4096))  # zeros written: the host holds the page
    assert run(memory, t.cr3, TEXT).summary() == "maps to gpa 0x2a003c4; that page reads ALL ZEROS (host page: allocated)"


@pytest.mark.parametrize(("level", "name"), [(4, "PML4"), (3, "PDPT"), (2, "PD"), (1, "PT")])
def test_not_present_at_each_level_stops_there(memory: GuestMemory, level: int, name: str) -> None:
    t = Tables(memory)
    tables = t.map(TEXT & ~0xFFF, 0x2A00000)
    t.map(0xFFFFFFFF81000000, 0x2000000)  # a neighbour keeps every table page non-zero
    entry_at = t.entry_at(tables[4 - level], TEXT, level)
    memory.write_u64(entry_at, memory.read_u64(entry_at) & ~1)  # clear Present only
    result = run(memory, t.cr3, TEXT)
    assert result.gpa is None
    assert len(result.steps) == 5 - level
    last = result.steps[-1]
    assert last.level == level and not last.present and last.table_zero is False
    assert result.summary() == f"NOT PRESENT at the {name}"
    assert "NOT PRESENT" in last.describe() and "ALL ZEROS" not in last.describe()


def test_a_zeroed_table_page_is_named(memory: GuestMemory) -> None:
    t = Tables(memory)
    tables = t.map(TEXT & ~0xFFF, 0x2A00000)
    pd = tables[2]
    memory.discard(pd, 4096)  # as if the host had given the PD page back: it reads as zeros
    report = describe(memory, cr0=CR0, cr3=t.cr3, cr4=CR4, efer=EFER, rip=TEXT, rsp=TEXT)
    result = run(memory, t.cr3, TEXT)
    assert result.steps[-1].table == pd and result.steps[-1].entry == 0 and result.steps[-1].table_zero
    assert result.zeroed_tables() == [pd]
    assert report.zeroed_tables == [pd]
    # The rip walk read the hole first (which makes the host allocate it): the rsp walk through the same page
    # still reports the host's state as first seen.
    assert report.lines.count(f"    PD table {pd:#x} [13] = 0x0 NOT PRESENT, table page ALL ZEROS (host page: hole)") == 2
    assert report.lines[-1] == f"page walk: table pages that read ALL ZEROS: {pd:#x}"
    assert memory.host_page_state(pd) == "allocated"  # why the first look is kept
    memory.write(pd, bytes(4096))  # a table page the guest (or anyone) filled with zeros: allocated, not a hole
    assert run(memory, t.cr3, TEXT).steps[-1].describe().endswith("table page ALL ZEROS (host page: allocated)")


def test_the_host_state_of_a_page_is_read_without_touching_it() -> None:
    with GuestMemory([MemoryRegion.memfd(0, 4 * MiB, "ram0"), MemoryRegion.anonymous(8 * MiB, 4 * MiB, "anon")]) as m:
        assert m.host_page_state(0x1000) == "hole" and m.host_page_state(0x1000) == "hole"
        m.write(0x1234, b"x")
        assert m.host_page_state(0x1000) == "allocated"
        m.discard(0x1000, 0x1000)
        assert m.host_page_state(0x1FFF) == "hole"
        assert m.host_page_state(4 * MiB - 4096) == "hole"  # no data up to the end of the memfd: ENXIO
        assert m.host_page_state(8 * MiB) == "not resident"
        m.write(8 * MiB, b"x")
        assert m.host_page_state(8 * MiB + 5) == "resident"
        assert m.host_page_state(6 * MiB) == "" and m.host_page_state(1 << 40) == ""


def test_cr3_outside_guest_ram_is_reported_and_never_read(memory: GuestMemory) -> None:
    reads: list[tuple[int, int]] = []

    class Recording:
        def read(self, gpa: int, length: int) -> bytes:
            reads.append((gpa, length))
            return memory.read(gpa, length)

    cr3 = 0x7F_FFFF_F000 | 0x18 | 1 << 63  # flag bits and the no-flush bit are not part of the address
    result = walk(Recording(), cr3, TEXT, 4)
    (step,) = result.steps
    assert step.table == 0x7F_FFFF_F000 and step.entry is None and not step.present
    assert "not in guest memory" in step.problem
    assert result.summary() == "its PML4 table 0x7ffffff000 is not readable guest RAM"
    assert "cannot read it: guest address 0x7ffffff000 is not in guest memory" in step.describe()
    assert reads == [(0x7F_FFFF_F000, 4096)]  # asked through the checked reader only, which refused


def test_an_entry_pointing_outside_ram_or_into_unplugged_memory_stops_the_walk(memory: GuestMemory) -> None:
    t = Tables(memory)
    tables = t.map(TEXT & ~0xFFF, 0x2A00000)
    memory.write_u64(t.entry_at(tables[1], TEXT, 3), 0xF_FFFF_FFFF_F000 | PRESENT_RW)
    result = run(memory, t.cr3, TEXT)
    assert [s.level for s in result.steps] == [4, 3, 2] and result.steps[-1].entry is None
    hidden = MemoryRegion.memfd(1 << 32, 4 * MiB, "mem-vm0")
    hidden.accessible = lambda offset, length: False  # an unplugged virtio-mem block
    memory.add(hidden)
    memory.write_u64(t.entry_at(tables[1], TEXT, 3), (1 << 32) | PRESENT_RW)
    step = run(memory, t.cr3, TEXT).steps[-1]
    assert step.entry is None and "inaccessible (unplugged) memory" in step.problem


def test_a_leaf_outside_ram_has_a_gpa_but_no_page_content(memory: GuestMemory) -> None:
    t = Tables(memory)
    t.map(TEXT & ~0xFFF, 0x80_0000_0000)
    result = run(memory, t.cr3, TEXT)
    assert result.gpa == 0x80_0000_03C4 and result.page_zero is None


def test_2m_and_1g_pages_end_the_walk_with_the_offset_inside_them(memory: GuestMemory) -> None:
    t = Tables(memory)
    t.map(0xFFFFFFFF81000000, 0x1000000, 2 * MiB)
    t.map(0xFFFF888000000000, 0, 1 << 30)  # the direct map in 1G pages
    big = run(memory, t.cr3, 0xFFFFFFFF8112345F)
    assert big.gpa == 0x112345F  # the PAT bit 12 of the entry is not part of the address
    assert [s.level for s in big.steps] == [4, 3, 2] and big.steps[-1].huge
    assert "(2M page)" in big.steps[-1].describe()
    huge = run(memory, t.cr3, 0xFFFF888001234567)
    assert huge.gpa == 0x1234567 and [s.level for s in huge.steps] == [4, 3]
    assert "(1G page)" in huge.steps[-1].describe()


def test_five_level_paging_walks_from_the_pml5(memory: GuestMemory) -> None:
    t = Tables(memory, levels=5)
    tables = t.map(0xFF11_2233_4455_6000, 0x3000000)
    assert paging_levels(CR0, CR4_LA57, EFER) == 5 and paging_levels(CR0, CR4, EFER) == 4
    result = run(memory, t.cr3, 0xFF11_2233_4455_6ABC, 5)
    assert result.gpa == 0x3000ABC and [s.level for s in result.steps] == [5, 4, 3, 2, 1]
    assert [s.table for s in result.steps] == tables
    assert result.steps[0].index == (0xFF11_2233_4455_6000 >> 48) & 0x1FF
    report = describe(memory, cr0=CR0, cr3=t.cr3, cr4=CR4_LA57, efer=EFER, rip=0xFF11_2233_4455_6ABC, rsp=0)
    assert report.lines[0] == f"page walk from cr3={t.cr3:#x} (5-level paging), the tables as they read now:"
    assert "    PML5 table" in report.lines[2]


def test_non_canonical_addresses_and_no_long_mode_are_not_walked(memory: GuestMemory) -> None:
    assert run(memory, 0x100000, 0x0000_8000_0000_0000).problem == "non-canonical address for 4-level paging"
    assert run(memory, 0x100000, 0x0000_8000_0000_0000, 5).problem == ""  # canonical with 57 bits
    assert paging_levels(0x10, 0, 0) == 0
    report = describe(memory, cr0=0x10, cr3=0, cr4=0, efer=0, rip=0xFFF0, rsp=0)
    assert report.lines == ["page walk: not in long mode (cr0=0x10 cr4=0x0 efer=0x0): no walk"]


def _gate(handler: int, ist: int = 0) -> bytes:
    return (handler & 0xFFFF).to_bytes(2, "little") + (0x10).to_bytes(2, "little") + bytes((ist, 0x8E)) + (
        (handler >> 16) & 0xFFFF).to_bytes(2, "little") + (handler >> 32).to_bytes(4, "little") + bytes(4)  # fmt: skip


def test_the_idt_gates_and_their_handlers_are_walked(memory: GuestMemory) -> None:
    t = Tables(memory)
    t.map(TEXT & ~0xFFF, 0x2A00000)
    t.map(STACK & ~0xFFF, 0x2B00000)
    t.map(IDT, 0x2C00000)
    pf_handler, df_handler = 0xFFFFFFFF81E00A10, 0xFFFFFFFF81E01B20
    handler_tables = t.map(pf_handler & ~0xFFF, 0x2E00000)
    memory.write(0x2C00000 + 14 * 16, _gate(pf_handler))
    memory.write(0x2C00000 + 8 * 16, _gate(df_handler, ist=2))
    memory.write(0x2E00000, b"\x90")
    assert Gate.decode(_gate(df_handler, ist=2)) == Gate(df_handler, 0x10, 2, 0xE, True)
    report = describe(memory, cr0=CR0, cr3=t.cr3, cr4=CR4, efer=EFER, rip=TEXT, rsp=STACK, idt_base=IDT,
                      idt_limit=0xFFF)  # fmt: skip
    text = "\n".join(report.lines)
    assert f"IDT #PF gate (vector 14) {IDT + 14 * 16:#x}: maps to gpa {0x2C00000 + 14 * 16:#x}" in text
    assert f"    interrupt gate present handler {pf_handler:#x} cs=0x10 ist=0" in text
    assert f"#PF handler {pf_handler:#x}: maps to gpa 0x2e00a10" in text
    assert f"    interrupt gate present handler {df_handler:#x} cs=0x10 ist=2" in text
    assert f"#DF handler {df_handler:#x}: NOT PRESENT at the PT" in text  # same PT as #PF's, other entry
    assert report.zeroed_tables == []
    memory.discard(handler_tables[3], 4096)  # the handlers' PT page given back: both handlers lose their code
    report = describe(memory, cr0=CR0, cr3=t.cr3, cr4=CR4, efer=EFER, rip=TEXT, rsp=STACK, idt_base=IDT,
                      idt_limit=0xFFF)  # fmt: skip
    assert report.zeroed_tables == [handler_tables[3]]


def test_gates_beyond_the_idt_limit_or_unmapped_are_reported(memory: GuestMemory) -> None:
    t = Tables(memory)
    t.map(TEXT & ~0xFFF, 0x2A00000)
    short = describe(memory, cr0=CR0, cr3=t.cr3, cr4=CR4, efer=EFER, rip=TEXT, rsp=TEXT, idt_base=IDT,
                     idt_limit=0x8F)  # fmt: skip
    assert "IDT #PF gate (vector 14): beyond the IDT limit 0x8f" in short.lines
    assert any(line.startswith("IDT #DF gate (vector 8) 0xfffffe0000000080: NOT PRESENT") for line in short.lines)
    assert any(line.startswith("    the gate cannot be read: 0xfffffe0000000080: NOT PRESENT") for line in short.lines)
