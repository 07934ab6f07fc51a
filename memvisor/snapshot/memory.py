"""Guest RAM to and from the snapshot file, sparsely.

Saving: a page is written only if the host holds it (SEEK_DATA/SEEK_HOLE on the region's memfd: pages never
touched, taken by the balloon, given back by free page reporting or unplugged from virtio-mem are holes) and
it is not all zeros (and, decided by the caller, was not hinted free by the guest and left unwritten since:
memvisor.snapshot.writer). Runs of such pages go out in one pwrite each at their fixed offset; every other
page stays a hole in the file.

Loading: only the pages the bitmap marks are read, straight into the fresh (all-hole) guest RAM with preadv,
and checked against their chunk's CRC-32; everything else stays a hole in guest RAM.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot.fileformat import (
    CHUNK_PAGES,
    PAGE_SIZE,
    RegionImage,
    SnapshotFileError,
    bitmap_bytes,
    chunk_count,
)

Progress = Callable[[int], None]  # called with the bytes just handled
MAX_IO = 8 << 20


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
    present = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[: image.size // PAGE_SIZE]
    present = present.astype(bool)
    if int(present.sum()) != image.pages:
        raise SnapshotFileError(f"{where}: the page bitmap holds {int(present.sum())} pages, the state says {image.pages}")
    view = region.view
    for chunk in range(chunk_count(image.size)):
        first = chunk * CHUNK_PAGES
        crc = 0
        for start, stop in _runs(present[first : first + CHUNK_PAGES]):
            begin, end = (first + start) * PAGE_SIZE, (first + stop) * PAGE_SIZE
            _preadinto_exact(fd, view[begin:end], image.data_offset + begin, where)
            crc = zlib.crc32(view[begin:end], crc)
            progress(end - begin)
        expected = int.from_bytes(image.chunk_crcs[4 * chunk : 4 * chunk + 4], "little")
        if crc != expected:
            raise SnapshotFileError(
                f"{where}: data chunk {chunk} (guest {image.gpa + first * PAGE_SIZE:#x}) is corrupted (checksum mismatch)"
            )


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
