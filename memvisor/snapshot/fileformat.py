"""The snapshot file, version 1: a header, guest RAM as sparse page areas, then the state.

    offset 0       header (HEADER, 40 bytes, in its own 4 KiB page)
    4 KiB          for each RAM region, page aligned: its page bitmap, then its data area, `size` bytes long,
                   in which page N of the region sits at data_offset + N * 4096 (QEMU's mapped-ram idea).
                   Pages not in the bitmap are never written: they stay holes in the file.
    state_offset   the state: JSON (memvisor.snapshot.codec) of {"machine": ..., "memory": MemoryImage}

Header: magic "MVSNAP01" (8 bytes), version u32, page size u32, state offset u64, state length u64, CRC-32
u32 over the header's first 32 bytes and the state, padding u32; little-endian. The header is written last,
after everything else is fsynced: a file cut short by a crash has no valid header. Each region's bitmap has a
CRC-32 and each 2 MiB chunk of its data area one over the present pages, stored in the state.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from memvisor.snapshot.codec import StateError, decode, encode, require

MAGIC = b"MVSNAP01"
VERSION = 1
PAGE_SIZE = 4096
HEADER = struct.Struct("<8sIIQQII")
HEADER_CHECKED = 32  # the CRC covers these bytes of the header, then the state
CHUNK_PAGES = 512  # one data checksum per 2 MiB
MAX_STATE = 256 << 20


class SnapshotFileError(StateError):
    """The snapshot file is not one memvisor can load: truncated, corrupted, another version or format."""


@dataclass(frozen=True)
class RegionImage:
    """Where one RAM region's pages are in the file."""

    name: str
    gpa: int
    size: int
    bitmap_offset: int
    bitmap_crc: int
    data_offset: int
    pages: int  # pages present (set in the bitmap)
    chunk_crcs: bytes  # u32 little-endian per CHUNK_PAGES pages of the region

    def validate(self) -> None:
        require(self.size > 0 and self.size % PAGE_SIZE == 0, "size", f"{self.size} is not a positive multiple of 4 KiB")
        require(self.gpa % PAGE_SIZE == 0 and self.gpa >= 0, "gpa", f"{self.gpa:#x} is not page aligned")
        require(self.bitmap_offset % PAGE_SIZE == 0, "bitmap_offset", "is not page aligned")
        require(self.data_offset % PAGE_SIZE == 0, "data_offset", "is not page aligned")
        require(self.data_offset >= self.bitmap_offset + bitmap_bytes(self.size), "data_offset",
                "overlaps the bitmap")  # fmt: skip
        require(0 <= self.pages <= self.size // PAGE_SIZE, "pages", f"{self.pages} is more than the region holds")
        require(len(self.chunk_crcs) == 4 * chunk_count(self.size), "chunk_crcs",
                f"holds {len(self.chunk_crcs) // 4} checksums, expected {chunk_count(self.size)}")  # fmt: skip


@dataclass(frozen=True)
class MemoryImage:
    regions: tuple[RegionImage, ...]

    def validate(self) -> None:
        end = PAGE_SIZE
        for position, region in enumerate(self.regions):
            require(region.bitmap_offset >= end, f"regions[{position}].bitmap_offset", "overlaps what comes before")
            end = region.data_offset + region.size


def bitmap_bytes(size: int) -> int:
    return (size // PAGE_SIZE + 7) // 8


def chunk_count(size: int) -> int:
    return (size // PAGE_SIZE + CHUNK_PAGES - 1) // CHUNK_PAGES


def align_up(value: int, alignment: int = PAGE_SIZE) -> int:
    return (value + alignment - 1) // alignment * alignment


def layout_regions(regions: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """(bitmap offset, data offset) for each (name, gpa, size), one after another from the second page."""
    offsets = []
    position = PAGE_SIZE
    for _, _, size in regions:
        bitmap = position
        data = align_up(bitmap + bitmap_bytes(size), 2 << 20)  # 2 MiB: huge-page friendly, as mapped-ram
        offsets.append((bitmap, data))
        position = data + size
    return offsets


def write_header_and_state(fd: int, state_offset: int, machine: Any, memory: MemoryImage) -> int:
    """Write the state at `state_offset`, fsync, then the header, fsync; returns the state's length."""
    state = json.dumps({"machine": machine, "memory": encode(memory)}, separators=(",", ":")).encode()
    _write_all(fd, state, state_offset)
    os.fsync(fd)
    head = HEADER.pack(MAGIC, VERSION, PAGE_SIZE, state_offset, len(state), 0, 0)[:HEADER_CHECKED]
    crc = zlib.crc32(state, zlib.crc32(head))
    _write_all(fd, HEADER.pack(MAGIC, VERSION, PAGE_SIZE, state_offset, len(state), crc, 0), 0)
    os.fsync(fd)
    return len(state)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def read_header_and_state(fd: int) -> tuple[Any, MemoryImage]:
    """Check the header and the state's checksum; return (machine state as JSON values, MemoryImage)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size:
        raise SnapshotFileError(f"the file is truncated: {size} bytes, too short for a snapshot header")
    magic, version, page_size, state_offset, state_length, crc, _ = HEADER.unpack(head)
    if magic != MAGIC:
        raise SnapshotFileError("not a memvisor snapshot (wrong magic): give a file written by memvisor's migrate")
    if version != VERSION:
        raise SnapshotFileError(f"snapshot version {version} is not supported: this memvisor reads version {VERSION}")
    if page_size != PAGE_SIZE:
        raise SnapshotFileError(f"snapshot page size {page_size} is not {PAGE_SIZE}")
    if state_length > MAX_STATE or state_offset < PAGE_SIZE:
        raise SnapshotFileError("the snapshot header is corrupted (state offset or length out of range)")
    if state_offset + state_length > size:
        raise SnapshotFileError(
            f"the file is truncated: its state ends at byte {state_offset + state_length}, the file has {size}"
        )
    state = os.pread(fd, state_length, state_offset)
    if zlib.crc32(state, zlib.crc32(head[:HEADER_CHECKED])) != crc:
        raise SnapshotFileError("the snapshot's header or state is corrupted (checksum mismatch)")
    try:
        document = json.loads(state)
    except ValueError:
        raise SnapshotFileError("the snapshot's state is not valid JSON") from None
    if not isinstance(document, dict) or set(document) != {"machine", "memory"}:
        raise SnapshotFileError("the snapshot's state lacks its machine or memory part")
    memory = decode(MemoryImage, document["memory"], "memory")
    for position, region in enumerate(memory.regions):
        if region.data_offset + region.size > state_offset:
            raise SnapshotFileError(f"memory.regions[{position}]: its data area runs into the state")
    return document["machine"], memory
