"""Reading an uncompressed x86-64 Linux kernel (vmlinux, an ELF executable) for a direct 64-bit boot.

A bzImage carries the kernel XZ-compressed behind a decompressor that the guest runs first; under nested TCG that
decompression is most of a guest's start (about 20 s in the lab). A vmlinux is the kernel itself: memvisor copies
its loadable segments to their physical addresses and enters `startup_64` at the ELF entry point, in long mode
with RSI pointing at the zero page, which is the 64-bit boot protocol of Documentation/x86/boot.rst applied to
the decompressed kernel (what the decompressor itself jumps to, and how Firecracker boots a vmlinux). The kernel
then runs at its link address: no KASLR (the decompressor is what randomizes).

Layouts from the System V ABI's ELF-64 Object File Format (version 1.5): "ELF Header" and "Program Header".
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from memvisor.boot import layout
from memvisor.errors import MemvisorError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
# e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum (from offset 16)
ELF64_HEADER = struct.Struct("<HHIQQQIHHH")
ELF64_HEADER_OFFSET = 16
ELF64_HEADER_SIZE = 64
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1
PT_NOTE = 4
MAX_PROGRAM_HEADERS = 64  # a vmlinux has 5; a file claiming thousands is not a kernel

# The setup header fields a direct boot fills in (Documentation/x86/boot.rst, "The Real-Mode Kernel Header"),
# as offsets into struct boot_params; there is no bzImage whose header could be copied.
BOOT_FLAG_OFFSET, BOOT_FLAG = 0x1FE, 0xAA55
HEADER_OFFSET, HEADER_MAGIC = 0x202, b"HdrS"
VERSION_OFFSET, BOOT_PROTOCOL = 0x206, 0x020F  # 2.15, what Linux 6.1 reports
INITRD_ADDR_MAX_OFFSET = 0x22C
KERNEL_ALIGNMENT_OFFSET = 0x230
CMDLINE_SIZE_OFFSET = 0x238
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_END = 0x268
# x86's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) less its NUL; initrd below 2 GiB as boot.rst's default.
CMDLINE_SIZE = 2047
INITRD_ADDR_MAX = 0x7FFF_FFFF
KERNEL_ALIGNMENT = 0x20_0000


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD segment: `filesz` bytes from `offset` in the file go to guest physical `paddr`; the rest of
    `memsz` is zeros."""

    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfKernel:
    """A parsed vmlinux: where each segment goes and where the boot vCPU starts."""

    path: Path
    entry_point: int
    segments: tuple[Segment, ...]
    # What the loader asks of any kernel image (as bzimage.BzImage has them from its header).
    initrd_addr_max: int = INITRD_ADDR_MAX
    cmdline_size: int = CMDLINE_SIZE

    @property
    def load_end(self) -> int:
        """One past the last byte the kernel occupies (its .bss and brk included)."""
        return max(segment.paddr + segment.memsz for segment in self.segments)

    @property
    def setup_header(self) -> bytes:
        """The setup header bytes (from boot_params offset 0x1f1) a direct boot hands the kernel."""
        header = bytearray(SETUP_HEADER_END - SETUP_HEADER_START)

        def put(offset: int, fmt: str, value: int | bytes) -> None:
            struct.pack_into(fmt, header, offset - SETUP_HEADER_START, value)

        put(BOOT_FLAG_OFFSET, "<H", BOOT_FLAG)
        put(HEADER_OFFSET, "4s", HEADER_MAGIC)
        put(VERSION_OFFSET, "<H", BOOT_PROTOCOL)
        put(INITRD_ADDR_MAX_OFFSET, "<I", self.initrd_addr_max)
        put(KERNEL_ALIGNMENT_OFFSET, "<I", KERNEL_ALIGNMENT)
        put(CMDLINE_SIZE_OFFSET, "<I", self.cmdline_size)
        return bytes(header)


def is_elf(path: Path) -> bool:
    """True if the file starts with the ELF magic (unreadable files are left to the parser's errors)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(ELF_MAGIC)) == ELF_MAGIC
    except OSError:
        return False


def parse_elf_kernel(path: Path) -> ElfKernel:
    """Parse `path` as an x86-64 vmlinux, or raise MemvisorError naming what is wrong with it."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(ELF64_HEADER_SIZE)
            if len(head) < ELF64_HEADER_SIZE or head[:4] != ELF_MAGIC:
                raise MemvisorError(f"kernel {path} is not an ELF file")
            if head[4] != ELFCLASS64 or head[5] != ELFDATA2LSB:
                raise MemvisorError(f"kernel {path} is not a 64-bit little-endian ELF: give an x86_64 vmlinux")
            e_type, e_machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = (
                ELF64_HEADER.unpack_from(head, ELF64_HEADER_OFFSET)
            )
            if e_type != ET_EXEC or e_machine != EM_X86_64:
                raise MemvisorError(
                    f"kernel {path} is not an x86_64 executable (ELF type {e_type}, machine {e_machine}): "
                    "give a vmlinux or a bzImage"
                )
            if phentsize < ELF64_PHDR.size or not 0 < phnum <= MAX_PROGRAM_HEADERS:
                raise MemvisorError(f"kernel {path} has a malformed program header table ({phnum} entries)")
            file.seek(phoff)
            table = file.read(phentsize * phnum)
    except OSError as error:
        raise MemvisorError(f"cannot read kernel {path}: {error.strerror}") from None
    if len(table) < phentsize * phnum:
        raise MemvisorError(f"kernel {path} is truncated (its program headers end past the file): download it again")
    segments = []
    for index in range(phnum):
        p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align = ELF64_PHDR.unpack_from(table, index * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > size:
            raise MemvisorError(f"kernel {path}: loadable segment {index} lies past the end of the file (truncated?)")
        segments.append(Segment(offset, paddr, filesz, memsz))
    if not segments:
        raise MemvisorError(f"kernel {path} has no loadable segments")
    kernel = ElfKernel(path, entry, tuple(segments))
    if not any(s.paddr <= entry < s.paddr + s.filesz for s in segments):
        raise MemvisorError(f"kernel {path}: its entry point {entry:#x} is in none of its loadable segments")
    if min(s.paddr for s in segments) < layout.HIGH_MEMORY_START:
        raise MemvisorError(
            f"kernel {path} loads below 1 MiB, where memvisor keeps its boot tables: not a Linux vmlinux"
        )
    return kernel
