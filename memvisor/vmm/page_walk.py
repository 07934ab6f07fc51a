"""Walk a guest's x86-64 page tables from a CR3, through checked guest-memory reads only: evidence after a triple fault.

A triple fault while delivering a #PF for an instruction fetch (issue 13) means the guest's own page tables
said "not present" for code it had just been running. This module answers, from the CR3 a vCPU last had (the
exit trail, memvisor/vmm/exit_trail.py), what the tables say *now* for an address: at each level the table
page's guest physical address (GPA), the index, the entry, whether it is present, and whether the whole table
page reads as zeros (what a page given back to the host, or never written, reads as), and for a page that does,
whether the host holds it at all ("host page: hole": not allocated in the memfd, as after a discard that nobody
touched since; "allocated": zeros were written, or the page was faulted in after a discard). The host state is
asked before the page is read, since reading a hole of a shared memfd allocates it. `describe()` also decodes
the #PF and #DF gates of the IDT and walks their handlers.

Layout (Intel SDM vol. 3A, 4.5 "4-level paging and 5-level paging"; AMD APM vol. 2, 5.3 "Long-mode page
translation"): CR3 bits 51:12 are the top table's GPA (bits 11:0 are flags or the PCID, bit 63 the no-flush
bit); each table is 512 8-byte entries indexed by 9 bits of the linear address (PML5 56:48, PML4 47:39, PDPT
38:30, PD 29:21, PT 20:12); an entry's bit 0 is Present, bit 7 (PS) in a PDPT/PD entry makes it a 1 GiB/2 MiB
page, bits 51:12 are the next table's (or page's) GPA, the high bits are NX and protection keys. 5-level
paging is on when CR4.LA57 (bit 12) is set; long mode when EFER.LMA (bit 10), CR0.PG (bit 31) and CR4.PAE
(bit 5). An IDT gate in long mode (SDM 6.14.1) is 16 bytes: offset 15:0 at 0, selector at 2, IST at 4 (bits
2:0), type and present at 5 (bit 7 present), offset 31:16 at 6, offset 63:32 at 8.

Everything read is guest-controlled: CR3 and every entry may point anywhere. Every read goes through a
`GuestMemory`-like reader, whose range checks refuse addresses outside guest RAM (and unplugged virtio-mem
blocks) with GuestMemoryError; such a table is reported as outside RAM, never read from the host. A walk is at
most 5 tables, so the cost is bounded whatever the guest wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from memvisor.memory.guest_memory import GuestMemoryError

PAGE = 4096
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12
PRESENT = 1 << 0
PAGE_SIZE_BIT = 1 << 7
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
HUGE_SHIFT = {3: 30, 2: 21}  # a PS entry at that level maps a page of 1 << shift bytes
GATE_SIZE = 16
ZERO_PAGE = bytes(PAGE)
VECTORS = ((14, "#PF"), (8, "#DF"))


class Reader(Protocol):
    """What the walk reads with: GuestMemory.read (GuestMemoryError outside guest RAM)."""

    def read(self, gpa: int, length: int) -> bytes: ...


def _host_state(reader: Reader, gpa: int) -> str:
    """GuestMemory.host_page_state when the reader has it (asked BEFORE reading: reading a hole of a shared memfd
    makes the host allocate it)."""
    probe = getattr(reader, "host_page_state", None)
    return str(probe(gpa)) if probe is not None else ""


class _FirstLook:
    """A reader that remembers each page's host state as first seen: a later walk through the same table page (read
    by an earlier walk, hence allocated now) still reports what the host held before memvisor looked."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader
        self._states: dict[int, str] = {}

    def read(self, gpa: int, length: int) -> bytes:
        return self._reader.read(gpa, length)

    def host_page_state(self, gpa: int) -> str:
        page = gpa & ~(PAGE - 1)
        if page not in self._states:
            self._states[page] = _host_state(self._reader, page)
        return self._states[page]


@dataclass(frozen=True)
class Step:
    """One level of a walk: the table page at `table`, its entry `index` (None: the table could not be read)."""

    level: int
    table: int
    index: int
    entry: int | None
    table_zero: bool | None  # the whole table page reads as zeros (None: not readable)
    problem: str = ""  # why the table could not be read
    host: str = ""  # the host's backing of the table page before the walk read it: "hole", "allocated", ...

    @property
    def present(self) -> bool:
        return self.entry is not None and bool(self.entry & PRESENT)

    @property
    def huge(self) -> bool:
        return self.present and self.level in HUGE_SHIFT and bool(self.entry and self.entry & PAGE_SIZE_BIT)

    def describe(self) -> str:
        name = LEVEL_NAMES[self.level]
        where = f"{name} table {self.table:#x} [{self.index}]"
        if self.entry is None:
            return f"{where}: cannot read it: {self.problem}"
        state = "present" if self.present else "NOT PRESENT"
        if self.huge:
            state += f" ({'1G' if self.level == 3 else '2M'} page)"
        zeros = ", table page ALL ZEROS" if self.table_zero else ""
        if self.table_zero and self.host:
            zeros += f" (host page: {self.host})"
        return f"{where} = {self.entry:#x} {state}{zeros}"


@dataclass
class Walk:
    """The walk of one linear address: its steps and where it ended."""

    address: int
    steps: list[Step] = field(default_factory=list)
    gpa: int | None = None  # the guest physical address it maps to, when every level was present
    page_zero: bool | None = None  # the 4 KiB page holding `gpa` reads as zeros (None: unknown)
    page_host: str = ""  # the host's backing of that page before the walk read it
    problem: str = ""  # why there is no walk at all (not long mode, non-canonical address)

    def zeroed_tables(self) -> list[int]:
        return [step.table for step in self.steps if step.table_zero]

    def summary(self) -> str:
        if self.problem:
            return self.problem
        if self.gpa is not None:
            zeros = "; that page reads ALL ZEROS" if self.page_zero else ""
            if self.page_zero and self.page_host:
                zeros += f" (host page: {self.page_host})"
            return f"maps to gpa {self.gpa:#x}{zeros}"
        last = self.steps[-1] if self.steps else None
        if last is None:
            return "no walk"
        if last.entry is None:
            return f"its {LEVEL_NAMES[last.level]} table {last.table:#x} is not readable guest RAM"
        return f"NOT PRESENT at the {LEVEL_NAMES[last.level]}"


def paging_levels(cr0: int, cr4: int, efer: int) -> int:
    """5 or 4 in long mode, 0 otherwise (no 4/5-level tables to walk)."""
    if not (cr0 & CR0_PG and cr4 & CR4_PAE and efer & EFER_LMA):
        return 0
    return 5 if cr4 & CR4_LA57 else 4


def canonical(address: int, levels: int) -> bool:
    """Bits 63:47 (63:56 with 5 levels) are all equal."""
    top = 47 if levels == 4 else 56
    high = address >> top
    return high in (0, (1 << (64 - top)) - 1)


def _read(reader: Reader, gpa: int, length: int) -> tuple[bytes | None, str]:
    try:
        return reader.read(gpa, length), ""
    except GuestMemoryError as err:
        return None, str(err)


def walk(reader: Reader, cr3: int, address: int, levels: int) -> Walk:
    """Translate the linear `address` with the tables at `cr3` (`levels` = 4 or 5), reading through `reader`."""
    result = Walk(address)
    if levels not in (4, 5):
        result.problem = "not in long mode: no 4- or 5-level tables"
        return result
    if not canonical(address, levels):
        result.problem = f"non-canonical address for {levels}-level paging"
        return result
    table = cr3 & ADDRESS_MASK
    for level in range(levels, 0, -1):
        index = (address >> (12 + 9 * (level - 1))) & 0x1FF
        host = _host_state(reader, table)
        data, problem = _read(reader, table, PAGE)
        if data is None:
            result.steps.append(Step(level, table, index, None, None, problem))
            return result
        entry = int.from_bytes(data[index * 8 : index * 8 + 8], "little")
        step = Step(level, table, index, entry, data == ZERO_PAGE, host=host)
        result.steps.append(step)
        if not step.present:
            return result
        if step.huge:
            shift = HUGE_SHIFT[level]
            gpa = (entry & ADDRESS_MASK & ~((1 << shift) - 1)) | (address & ((1 << shift) - 1))
            break
        table = entry & ADDRESS_MASK
    else:
        gpa = table | (address & (PAGE - 1))
    result.gpa = gpa
    result.page_host = _host_state(reader, gpa)
    page, _ = _read(reader, gpa & ~(PAGE - 1), PAGE)
    result.page_zero = None if page is None else page == ZERO_PAGE
    return result


def read_linear(reader: Reader, cr3: int, address: int, length: int, levels: int) -> tuple[bytes | None, str]:
    """`length` bytes (at most a page) at a linear address through the tables; (None, why) when not mapped."""
    data = b""
    while length > 0:
        translated = walk(reader, cr3, address, levels)
        if translated.gpa is None:
            return None, f"{address:#x}: {translated.summary()}"
        chunk = min(length, PAGE - (address & (PAGE - 1)))
        part, problem = _read(reader, translated.gpa, chunk)
        if part is None:
            return None, problem
        data += part
        address, length = (address + chunk) & ((1 << 64) - 1), length - chunk
    return data, ""


@dataclass(frozen=True)
class Gate:
    """A long-mode IDT gate (SDM 6.14.1)."""

    offset: int
    selector: int
    ist: int
    kind: int
    present: bool

    @classmethod
    def decode(cls, raw: bytes) -> Gate:
        offset = int.from_bytes(raw[0:2], "little") | int.from_bytes(raw[6:8], "little") << 16
        offset |= int.from_bytes(raw[8:12], "little") << 32
        return cls(offset, int.from_bytes(raw[2:4], "little"), raw[4] & 7, raw[5] & 0xF, bool(raw[5] & 0x80))

    def describe(self) -> str:
        kinds = {0xE: "interrupt gate", 0xF: "trap gate"}
        return (f"{kinds.get(self.kind, f'type {self.kind:#x}')} {'present' if self.present else 'NOT PRESENT'} "
                f"handler {self.offset:#x} cs={self.selector:#x} ist={self.ist}")  # fmt: skip


def _walk_lines(label: str, result: Walk) -> list[str]:
    lines = [f"{label} {result.address:#x}: {result.summary()}"]
    lines += [f"    {step.describe()}" for step in result.steps]
    return lines


@dataclass
class Report:
    """Every walk of one triple fault, as lines for stderr, and the table pages that read as zeros."""

    lines: list[str] = field(default_factory=list)
    zeroed_tables: list[int] = field(default_factory=list)


def describe(reader: Reader, *, cr0: int, cr3: int, cr4: int, efer: int, rip: int, rsp: int,
             idt_base: int | None = None, idt_limit: int = 0, extra: Sequence[tuple[str, int]] = (),
             at_ns: int | None = None) -> Report:  # fmt: skip
    """Walk RIP, RSP, the (label, address) pairs of `extra` (other vCPUs' last RIPs) and, with the IDT's base,
    the #PF and #DF gates and their handlers, all from `cr3`. `at_ns`: when (time.monotonic_ns(), the clock of
    MEMVISOR_DISCARD_LOG), named in the first line."""
    report = Report()
    reader = _FirstLook(reader)
    levels = paging_levels(cr0, cr4, efer)
    if not levels:
        report.lines.append(f"page walk: not in long mode (cr0={cr0:#x} cr4={cr4:#x} efer={efer:#x}): no walk")
        return report
    when = f" at monotonic {at_ns} ns" if at_ns is not None else ""
    report.lines.append(f"page walk{when} from cr3={cr3:#x} ({levels}-level paging), the tables as they read now:")
    walks = [("rip", walk(reader, cr3, rip, levels)), ("rsp", walk(reader, cr3, rsp, levels))]
    walks += [(label, walk(reader, cr3, address, levels)) for label, address in extra]
    for label, result in walks:
        report.lines += _walk_lines(label, result)
    if idt_base is not None:
        for vector, name in VECTORS:
            at = (idt_base + vector * GATE_SIZE) & ((1 << 64) - 1)
            label = f"IDT {name} gate (vector {vector})"
            if vector * GATE_SIZE + GATE_SIZE - 1 > idt_limit:
                report.lines.append(f"{label}: beyond the IDT limit {idt_limit:#x}")
                continue
            gate_walk = walk(reader, cr3, at, levels)
            walks.append((label, gate_walk))
            report.lines += _walk_lines(label, gate_walk)
            raw, problem = read_linear(reader, cr3, at, GATE_SIZE, levels)
            if raw is None:
                report.lines.append(f"    the gate cannot be read: {problem}")
                continue
            gate = Gate.decode(raw)
            report.lines.append(f"    {gate.describe()}")
            handler = walk(reader, cr3, gate.offset, levels)
            walks.append((f"{name} handler", handler))
            report.lines += _walk_lines(f"{name} handler", handler)
    for _, result in walks:
        for table in result.zeroed_tables():
            if table not in report.zeroed_tables:
                report.zeroed_tables.append(table)
    if report.zeroed_tables:
        report.lines.append("page walk: table pages that read ALL ZEROS: "
                            + ", ".join(f"{t:#x}" for t in report.zeroed_tables))  # fmt: skip
    else:
        report.lines.append("page walk: no table page on these walks reads all zeros")
    return report
