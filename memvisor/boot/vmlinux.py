"""Making the uncompressed kernel a direct boot loads: the vmlinux inside a bzImage, compacted.

A Debian bzImage holds its kernel as an XZ stream; `decompress_payload` finds and unpacks it (stdlib lzma, or zlib
for gzip kernels). The vmlinux that comes out is about 63 MiB, most of it symbols and zero-filled data: `compact_elf`
rewrites it with only what a loader reads, the ELF header, the program headers and each segment's bytes up to its
last non-zero byte (the rest of a segment is zero-filled by the loader, as ELF's p_memsz > p_filesz allows), and
the notes (so that QEMU can still boot it through its PVH note). For Linux 6.1: 34 MiB, all of it loaded.

The guest image keeps this file beside the bzImage (memvisor/guest/image.py) and `memvisor run` boots it by
default; memvisor/boot/elf.py reads it back.
"""

from __future__ import annotations

import lzma
import os
import struct
import tempfile
import zlib
from pathlib import Path

from memvisor.boot.elf import (
    ELF64_HEADER,
    ELF64_HEADER_OFFSET,
    ELF64_HEADER_SIZE,
    ELF64_PHDR,
    ELF_MAGIC,
    HEADER_OFFSET,
    PT_LOAD,
    PT_NOTE,
    VERSION_OFFSET,
)

XZ_MAGIC = b"\xfd7zXZ\x00"
PAYLOAD_OFFSET = 0x248  # payload_offset, payload_length (__u32 each)
PAYLOAD = struct.Struct("<II")
PAYLOAD_PROTOCOL = 0x0208
GZIP_MAGIC = b"\x1f\x8b\x08"
SEGMENT_ALIGN = 4096  # file offsets of segments in the compact file


def decompress_payload(bzimage: bytes) -> bytes | None:
    """The vmlinux inside a bzImage (XZ or gzip payloads), or None if none is found.

    The payload is where the setup header says (payload_offset, boot protocol 2.08+); a blob without a header is
    searched for a stream. Other compressions (Debian's cloud kernel is zstd, which Python 3.11 cannot unpack)
    give None: that kernel boots through its own decompressor."""
    exact = _header_payload(bzimage)
    if exact is not None:
        if not exact.startswith((XZ_MAGIC, GZIP_MAGIC)):
            return None
        bzimage = exact
    start = bzimage.find(XZ_MAGIC)
    if start >= 0:
        try:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            return None
    start = bzimage.find(GZIP_MAGIC)
    if start >= 0:
        try:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return decompressor.decompress(bzimage[start:])
        except zlib.error:
            return None
    return None


def _header_payload(bzimage: bytes) -> bytes | None:
    """The compressed payload the setup header points at (Documentation/x86/boot.rst: payload_offset and
    payload_length at 0x248, from the start of the protected-mode code), or None without such a header."""
    if len(bzimage) < 0x250 or bzimage[HEADER_OFFSET : HEADER_OFFSET + 4] != b"HdrS":
        return None
    version, setup_sects = struct.unpack_from("<H", bzimage, VERSION_OFFSET)[0], bzimage[0x1F1] or 4
    if version < PAYLOAD_PROTOCOL:
        return None
    offset, length = PAYLOAD.unpack_from(bzimage, PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start : start + length] if start + length <= len(bzimage) else None


def compact_elf(elf: bytes) -> bytes:
    """`elf` with only its program headers' contents, segments trimmed of trailing zeros; ValueError if malformed."""
    if not elf.startswith(ELF_MAGIC) or len(elf) < ELF64_HEADER_SIZE:
        raise ValueError("not an ELF file")
    fields = list(ELF64_HEADER.unpack_from(elf, ELF64_HEADER_OFFSET))
    phoff, phentsize, phnum = fields[4], fields[8], fields[9]
    if phentsize < ELF64_PHDR.size or phoff + phentsize * phnum > len(elf):
        raise ValueError("malformed program header table")
    headers = [list(ELF64_PHDR.unpack_from(elf, phoff + index * phentsize)) for index in range(phnum)]
    # Where each PT_LOAD's bytes go in the new file, and how many are kept.
    out_offset = _align(ELF64_HEADER_SIZE + ELF64_PHDR.size * phnum)
    moves: list[tuple[int, int, int]] = []  # (old offset, new offset, kept bytes) per PT_LOAD
    for header in headers:
        p_type, _flags, offset, _vaddr, _paddr, filesz = header[:6]
        if p_type != PT_LOAD:
            continue
        if offset + filesz > len(elf):
            raise ValueError("a loadable segment lies past the end of the file")
        kept = len(elf[offset : offset + filesz].rstrip(b"\0"))
        kept = max(kept, _notes_end_in(headers, offset, filesz) - offset)
        moves.append((offset, out_offset, kept))
        header[2], header[5] = out_offset, kept
        out_offset = _align(out_offset + kept)
    for header in headers:  # notes point into a loadable segment's bytes: follow them there
        if header[0] == PT_NOTE:
            for old, new, kept in moves:
                if old <= header[2] and header[2] + header[5] <= old + kept:
                    header[2] = new + header[2] - old
                    break
            else:
                header[0:8] = [header[0], header[1], 0, header[3], header[4], 0, 0, header[7]]
        elif header[0] != PT_LOAD:
            header[2], header[5] = 0, 0  # GNU_STACK and friends carry no bytes
    out = bytearray(out_offset)
    out[:ELF64_HEADER_OFFSET] = elf[:ELF64_HEADER_OFFSET]
    # Program headers right after the ELF header; no section headers (e_shoff 0, and e_shentsize, e_shnum,
    # e_shstrndx after the packed fields stay zero).
    fields[4], fields[5], fields[7], fields[8] = ELF64_HEADER_SIZE, 0, ELF64_HEADER_SIZE, ELF64_PHDR.size
    ELF64_HEADER.pack_into(out, ELF64_HEADER_OFFSET, *fields)
    for index, header in enumerate(headers):
        ELF64_PHDR.pack_into(out, ELF64_HEADER_SIZE + index * ELF64_PHDR.size, *header)
    for old, new, kept in moves:
        out[new : new + kept] = elf[old : old + kept]
    return bytes(out)


def _notes_end_in(headers: list[list[int]], offset: int, filesz: int) -> int:
    """The end of the last PT_NOTE that lies inside [offset, offset + filesz) (a note must be kept whole)."""
    ends = [h[2] + h[5] for h in headers if h[0] == PT_NOTE and offset <= h[2] < offset + filesz]
    return max(ends, default=offset)


def _align(value: int) -> int:
    return (value + SEGMENT_ALIGN - 1) & ~(SEGMENT_ALIGN - 1)


def write_direct_boot_kernel(bzimage: Path, target: Path) -> bool:
    """Write the compact vmlinux of `bzimage` to `target` (atomically); False if the bzImage has none."""
    elf = decompress_payload(bzimage.read_bytes())
    if elf is None:
        return False
    try:
        compact = compact_elf(elf)
    except ValueError:
        return False
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".vmlinux-", delete=False) as file:
        file.write(compact)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(file.name, 0o644)  # as readable as the bzImage beside it (the temp file was made 0600)
    os.replace(file.name, target)
    return True
