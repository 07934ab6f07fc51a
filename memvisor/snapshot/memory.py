"""Guest RAM to and from the snapshot file, sparsely.

Saving: a page is written only if the host holds it (SEEK_DATA/SEEK_HOLE on the region's memfd: pages never
touched, taken by the balloon, given back by free page reporting or unplugged from virtio-mem are holes) and
it is not all zeros (and, decided by the caller, was not hinted free by the guest and left unwritten since:
memvisor.snapshot.writer). Runs of such pages go out in one pwrite each at their fixed offset; every other
page stays a hole in the file.

Loading: only the pages the bitmap marks are read, checked against their chunk's CRC-32 and written into the
fresh (all-hole) guest RAM through its memfd with pwrite; everything else stays a hole in guest RAM. Writing
through the fd rather than copying into the mapping spares a page fault per 4 KiB page, the larger part of a
restore's time in the lab (under emulation a fault costs about 100 us: 3.8 s of 16 s for an idle 1G guest's 99
MiB). hugetlbfs takes no write(): there (EINVAL) the pages are copied into the mapping. Loading needs no numpy,
whose import alone cost a restore about 3 s in the lab; saving does.
"""

from __future__ import annotations

import errno
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot.fileformat import (
    CHUNK_PAGES,
    PAGE_SIZE,
    RegionImage,
    SnapshotFileError,
    bitmap_bytes,
    chunk_count,
)

if TYPE_CHECKING:
    import numpy as np

Progress = Callable[[int], None]  # called with the bytes just handled
MAX_IO = 8 << 20
SET_RUN = re.compile("1+")  # a run of present pages in page_bits' string


def data_extents(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """[start, end) byte ranges of the region the host has allocated (all of it without an fd to ask)."""
    if region.fd is None:
        yield 0, region.size
        return
    position = 0
    while position < region.size:
        try:
            start = os.lseek(region.fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return  # no data after position
            raise
        if start >= region.size:
            return
        end = min(os.lseek(region.fd, start, os.SEEK_HOLE), region.size)
        yield start - start % PAGE_SIZE, end
        position = end


def accessible_extents(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """The data extents cut to what the host mapping lets us read: an unplugged virtio-mem block is PROT_NONE
    (normally a hole as well; never read it, whatever the backing holds), checked per 2 MiB (virtio-mem blocks
    are 2 MiB multiples, aligned in their region)."""
    step = 2 << 20
    for start, end in data_extents(region):
        if region.accessible is None or region.accessible(start, end - start):
            yield start, end
            continue
        piece = start
        while piece < end:
            stop = min((piece // step + 1) * step, end)
            if region.accessible(piece, stop - piece):
                yield piece, stop
            piece = stop


def present_pages(region: MemoryRegion) -> np.ndarray:
    """A bool per page of the region: allocated by the host, readable and not all zeros."""
    import numpy as np

    present = np.zeros(region.size // PAGE_SIZE, dtype=bool)
    for start, end in accessible_extents(region):
        end = min(-(-end // PAGE_SIZE) * PAGE_SIZE, region.size)
        for piece in range(start, end, 64 << 20):  # a bounded slice at a time
            stop = min(piece + (64 << 20), end)
            words = np.frombuffer(region.view[piece:stop], dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
            present[piece // PAGE_SIZE : stop // PAGE_SIZE] = words.any(axis=1)
    return present


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """[first, last+1) runs of True in a bool array."""
    import numpy as np

    if not mask.any():
        return
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for start, stop in zip(edges[0::2], edges[1::2], strict=True):
        yield int(start), int(stop)


def save_region(
    fd: int,
    region: MemoryRegion,
    name: str,
    bitmap_offset: int,
    data_offset: int,
    progress: Progress,
    present: np.ndarray | None = None,
) -> RegionImage:
    """Write the region's bitmap and present pages (`present`: a bool per page, by default
    `present_pages(region)`); returns where they are, with their checksums."""
    import numpy as np

    if present is None:
        present = present_pages(region)
    if present.shape != (region.size // PAGE_SIZE,):
        raise ValueError(f"present mask of {present.shape} for a region of {region.size // PAGE_SIZE} pages")
    bitmap = np.packbits(present, bitorder="little").tobytes()
    _pwrite_all(fd, bitmap, bitmap_offset)
    crcs = bytearray()
    view = region.view
    for chunk in range(chunk_count(region.size)):
        first = chunk * CHUNK_PAGES
        mask = present[first : first + CHUNK_PAGES]
        crc = 0
        for start, stop in _runs(mask):
            begin, end = (first + start) * PAGE_SIZE, (first + stop) * PAGE_SIZE
            data = view[begin:end]
            crc = zlib.crc32(data, crc)
            _pwrite_all(fd, data, data_offset + begin)
            progress(end - begin)
        crcs += crc.to_bytes(4, "little")
    return RegionImage(
        name=name,
        gpa=region.gpa,
        size=region.size,
        bitmap_offset=bitmap_offset,
        bitmap_crc=zlib.crc32(bitmap),
        data_offset=data_offset,
        pages=int(present.sum()),
        chunk_crcs=bytes(crcs),
    )


def load_region(fd: int, region: MemoryRegion, image: RegionImage, where: str, progress: Progress) -> None:
    """Read the present pages of `image` into `region` (fresh, all holes), checking every chunk's CRC."""
    if image.size != region.size or image.gpa != region.gpa:
        raise SnapshotFileError(
            f"{where}: the snapshot has {image.size >> 20} MiB at {image.gpa:#x}, this machine "
            f"{region.size >> 20} MiB at {region.gpa:#x}: give the same --memory and devices as when it was saved"
        )
    bitmap = _pread_exact(fd, bitmap_bytes(image.size), image.bitmap_offset, where)
    if zlib.crc32(bitmap) != image.bitmap_crc:
        raise SnapshotFileError(f"{where}: the page bitmap is corrupted (checksum mismatch)")
    bits = page_bits(bitmap, image.size // PAGE_SIZE)
    if bits.count("1") != image.pages:
        raise SnapshotFileError(f"{where}: the page bitmap holds {bits.count('1')} pages, the state says {image.pages}")
    target = _RegionWriter(region)
    buffer = memoryview(bytearray(min(MAX_IO, image.size)))
    for chunk in range(chunk_count(image.size)):
        first = chunk * CHUNK_PAGES
        crc = 0
        for run in SET_RUN.finditer(bits, first, first + CHUNK_PAGES):
            begin, end = run.start() * PAGE_SIZE, run.end() * PAGE_SIZE
            for piece in range(begin, end, len(buffer)):
                data = buffer[: min(len(buffer), end - piece)]
                _preadinto_exact(fd, data, image.data_offset + piece, where)
                crc = zlib.crc32(data, crc)
                target.write(piece, data)
            progress(end - begin)
        expected = int.from_bytes(image.chunk_crcs[4 * chunk : 4 * chunk + 4], "little")
        if crc != expected:
            raise SnapshotFileError(
                f"{where}: data chunk {chunk} (guest {image.gpa + first * PAGE_SIZE:#x}) is corrupted (checksum mismatch)"
            )


def page_bits(bitmap: bytes, pages: int) -> str:
    """The file's page bitmap (bit i of byte i // 8, least significant first: page i) as one character per page,
    "1" present, "0" a hole: the runs of present pages are then a regular-expression search."""
    return format(int.from_bytes(bitmap, "little"), f"0{len(bitmap) * 8}b")[::-1][:pages]


class _RegionWriter:
    """Writes into a region's memory through its fd (no page faults), or through its mapping where there is no
    fd or the fd takes no write() (hugetlbfs: EINVAL)."""

    def __init__(self, region: MemoryRegion) -> None:
        self.region = region
        self.through_fd = region.fd is not None

    def write(self, offset: int, data: memoryview) -> None:
        if self.through_fd:
            assert self.region.fd is not None
            try:
                _pwrite_all(self.region.fd, data, offset)
                return
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.through_fd = False
        self.region.view[offset : offset + len(data)] = data


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:MAX_IO], offset)
        view = view[written:]
        offset += written


def _pread_exact(fd: int, length: int, offset: int, where: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise SnapshotFileError(f"{where}: the file is truncated (bitmap at {offset})")
    return data


def _preadinto_exact(fd: int, target: memoryview, offset: int, where: str) -> None:
    while target:
        got = os.preadv(fd, [target[:MAX_IO]], offset)
        if got == 0:
            raise SnapshotFileError(f"{where}: the file is truncated (page data at {offset})")
        target = target[got:]
        offset += got
