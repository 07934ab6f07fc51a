"""Read the shared libraries an x86-64 ELF program needs (its DT_NEEDED entries), without running it.

The image builder copies e2fsprogs' programs into the guest together with exactly the libraries they name,
found in the unpacked Debian packages, so the guest never depends on the host's libc.
Layouts: System V ABI "ELF-64 Object File Format" (file header, section header, dynamic section).
"""

from __future__ import annotations

import struct
from pathlib import Path

# ELF-64 file header fields used here: e_shoff at 0x28, e_shentsize/e_shnum/e_shstrndx at 0x3A.
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_SHOFF = struct.Struct("<Q")
_SHINFO = struct.Struct("<HHH")
# ELF-64 section header: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, ...
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
# ELF-64 dynamic entry: d_tag, d_val.
_DYN = struct.Struct("<qQ")
SHT_DYNAMIC = 6
DT_NULL = 0
DT_NEEDED = 1


class ElfError(ValueError):
    """The file is not a little-endian 64-bit ELF file, or its tables are out of bounds."""


def needed_libraries(path: Path) -> list[str]:
    """The sonames `path` lists as DT_NEEDED, in order (empty for a static program)."""
    blob = path.read_bytes()
    if blob[:4] != _ELF_MAGIC or blob[4] != _ELFCLASS64 or blob[5] != _ELFDATA2LSB:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    try:
        (shoff,) = _SHOFF.unpack_from(blob, 0x28)
        shentsize, shnum, _ = _SHINFO.unpack_from(blob, 0x3A)
        sections = [_SECTION_HEADER.unpack_from(blob, shoff + i * shentsize) for i in range(shnum)]
    except struct.error as exc:
        raise ElfError(f"{path}: section headers out of bounds") from exc
    needed: list[str] = []
    for section in sections:
        if section[1] != SHT_DYNAMIC:
            continue
        offset, size, link = section[4], section[5], section[6]
        if link >= len(sections):
            raise ElfError(f"{path}: dynamic section names a missing string table")
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size - _DYN.size + 1, _DYN.size):
            tag, value = _DYN.unpack_from(blob, pos)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                start = strtab_offset + value
                end = blob.find(b"\0", start)
                if end < 0:
                    raise ElfError(f"{path}: unterminated library name")
                needed.append(blob[start:end].decode())
    return needed
