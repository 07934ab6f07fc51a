"""The lab boots the kernel as an uncompressed ELF through its PVH entry: no decompression under TCG.

Debian's bzImage is XZ-compressed; under TCG the kernel's own decompressor takes about 2 s of every lab start
(measured: QEMU start to kernel uptime 0 fell from about 2.8 s to about 0.5 s). The kernel has CONFIG_PVH, so
its vmlinux carries a XEN_ELFNOTE_PHYS32_ENTRY note and QEMU's `-kernel` boots that ELF directly.

`pvh_kernel(bzimage)` decompresses the payload once on the host (stdlib lzma/gzip), checks for the PVH note,
and caches the result (one at a time) keyed by the bzImage's content; it returns None when that is not possible, and the
lab boots the bzImage as before.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

from memvisor.boot.elf import ELF64_PHDR, PT_NOTE
from memvisor.boot.vmlinux import decompress_payload

__all__ = ["decompress_payload", "has_pvh_entry", "pvh_kernel"]

# ELF64 header fields used here (System V ABI, ELF-64 Object File Format 1.5, "ELF Header").
ELF_MAGIC = b"\x7fELF\x02\x01"  # 64-bit, little endian
ELF64_PHOFF = struct.Struct("<Q")  # at offset 0x20
ELF64_PHNUM = struct.Struct("<HH")  # e_phentsize, e_phnum at offset 0x36
# An ELF note header: namesz, descsz, type (same spec, "Note Section").
NOTE_HEADER = struct.Struct("<III")
# Xen's public/elfnote.h: the 32-bit physical entry point of a PVH kernel.
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memvisor" / "lab"


def has_pvh_entry(elf: bytes) -> bool:
    """True if `elf` is a 64-bit ELF with a Xen PHYS32_ENTRY note (what QEMU needs to boot it as PVH)."""
    if not elf.startswith(ELF_MAGIC) or len(elf) < 0x40:
        return False
    (phoff,) = ELF64_PHOFF.unpack_from(elf, 0x20)
    phentsize, phnum = ELF64_PHNUM.unpack_from(elf, 0x36)
    if phentsize < ELF64_PHDR.size:
        return False
    for index in range(phnum):
        offset = phoff + index * phentsize
        if offset + ELF64_PHDR.size > len(elf):
            return False
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz, _memsz, _align = ELF64_PHDR.unpack_from(
            elf, offset
        )
        if p_type == PT_NOTE and _notes_have_pvh(elf[p_offset : p_offset + p_filesz]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    offset = 0
    while offset + NOTE_HEADER.size <= len(notes):
        namesz, descsz, note_type = NOTE_HEADER.unpack_from(notes, offset)
        name_start = offset + NOTE_HEADER.size
        name = notes[name_start : name_start + namesz].rstrip(b"\x00")
        if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        offset = name_start + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def pvh_kernel(bzimage: Path, cache: Path | None = None) -> Path | None:
    """An uncompressed, PVH-bootable copy of `bzimage` (cached), or None if it cannot be made."""
    try:
        data = bzimage.read_bytes()
    except OSError:
        return None
    folder = cache or _cache_dir()
    target = folder / f"vmlinux-{hashlib.sha256(data).hexdigest()[:24]}"
    if target.is_file():
        return target
    elf = decompress_payload(data)
    if elf is None or not has_pvh_entry(elf):
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as file:
            file.write(elf)
        os.replace(file.name, target)
    except OSError:
        return None
    for old in folder.glob("vmlinux-*"):  # one kernel at a time: an older pin's copy is 60 MB of waste
        if old != target:
            old.unlink(missing_ok=True)
    return target
