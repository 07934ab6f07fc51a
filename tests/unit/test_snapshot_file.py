"""The snapshot file: sparse memory (only pages with data written, holes kept on both sides), checksums,
and bad input refused with a message naming the problem."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot import fileformat
from memvisor.snapshot import memory as snapshot_memory
from memvisor.snapshot.fileformat import MemoryImage, SnapshotFileError
from memvisor.snapshot.memory import load_region, page_bits, present_pages, save_region

MiB = 1 << 20
PAGE = 4096


def _region(size: int = 8 * MiB, gpa: int = 0) -> MemoryRegion:
    return MemoryRegion.memfd(gpa, size, "ram0")


def _fill(region: MemoryRegion) -> dict[int, bytes]:
    """Some pages with data, one touched but all zeros, the rest never touched."""
    pages = {0: b"a", 1: b"b", 7: b"c", 600: b"d", 1500: b"e", 2047: b"f"}
    for page, byte in pages.items():
        region.view[page * PAGE : (page + 1) * PAGE] = byte * PAGE
    region.view[900 * PAGE : 901 * PAGE] = bytes(PAGE)  # allocated but zero: not saved
    return pages


def _save(path: Path, region: MemoryRegion, machine: object = None) -> None:
    layout = fileformat.layout_regions([("ram0", region.gpa, region.size)])
    state_offset = fileformat.align_up(layout[-1][1] + region.size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, state_offset)
        image = save_region(fd, region, "ram0", *layout[0], lambda n: None)
        fileformat.write_header_and_state(fd, state_offset, machine or {"x": 1}, MemoryImage((image,)))
    finally:
        os.close(fd)


def _load(path: Path, region: MemoryRegion) -> object:
    fd = os.open(path, os.O_RDONLY)
    try:
        machine, image = fileformat.read_header_and_state(fd)
        load_region(fd, region, image.regions[0], "memory.regions[0]", lambda n: None)
        return machine
    finally:
        os.close(fd)


def test_present_pages_are_allocated_and_nonzero() -> None:
    region = _region()
    pages = _fill(region)
    present = present_pages(region)
    assert sorted(np.flatnonzero(present).tolist()) == sorted(pages)
    region.close()


def test_round_trip_writes_only_present_pages_and_keeps_holes(tmp_path: Path) -> None:
    source, target = _region(), _region()
    pages = _fill(source)
    path = tmp_path / "snap"
    _save(path, source)
    stat = path.stat()
    assert stat.st_size > 8 * MiB
    # Only the six data pages, the bitmap and the header/state: far below the 8 MiB of RAM.
    assert stat.st_blocks * 512 < 200 * 1024
    assert _load(path, target) == {"x": 1}
    assert target.allocated_bytes() == len(pages) * PAGE  # the rest of guest RAM stays holes
    assert bytes(target.view) == bytes(source.view)  # (reading a shmem hole allocates it: check after)
    # Save again from the restored region: the same pages, the same file contents.
    again = tmp_path / "again"
    _save(again, target)
    assert again.read_bytes() == path.read_bytes()
    source.close()
    target.close()


def test_page_bits_put_page_i_at_bit_i_of_byte_i_over_8() -> None:
    assert page_bits(bytes([0b0000_0101, 0b1000_0000]), 16) == "1010000000000001"
    assert page_bits(bytes([0xFF]), 5) == "11111"  # bits past the region's pages are cut off
    assert page_bits(bytes(3), 24) == "0" * 24


def test_loading_writes_through_the_fd_and_falls_back_to_the_mapping_where_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading writes guest RAM with pwrite on its memfd (no page fault per page); hugetlbfs refuses write()
    with EINVAL, and then the pages are copied into the mapping instead: the same memory either way."""
    source = _region()
    _fill(source)
    path = tmp_path / "snap"
    _save(path, source)
    through_fd, through_mapping = _region(), _region()
    written_to: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        written_to.append(fd)
        if fd == through_mapping.fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(snapshot_memory.os, "pwrite", pwrite)
    _load(path, through_fd)
    _load(path, through_mapping)
    assert written_to.count(through_mapping.fd) == 1  # tried once, then the mapping
    assert written_to.count(through_fd.fd) >= 4  # every run of present pages (0-1, 7, 600, 1500, 2047)
    assert bytes(through_fd.view) == bytes(source.view) == bytes(through_mapping.view)
    for region in (source, through_fd, through_mapping):
        region.close()


def test_loading_imports_no_numpy() -> None:
    """numpy's import cost a restore about 3 s in the lab: the load path does without it."""
    code = ("import sys; import memvisor.snapshot.memory, memvisor.snapshot.fileformat; "
            "print('numpy' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    region = _region()
    _fill(region)
    path = tmp_path / "snap"
    _save(path, region)
    region.close()
    return path


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))


def _load_error(path: Path) -> str:
    region = _region()
    try:
        with pytest.raises(SnapshotFileError) as caught:
            _load(path, region)
    finally:
        region.close()
    return str(caught.value)


def test_truncated_file_is_refused(snapshot: Path) -> None:
    os.truncate(snapshot, snapshot.stat().st_size - 10)
    assert "truncated" in _load_error(snapshot)
    os.truncate(snapshot, 20)
    assert "truncated" in _load_error(snapshot)


def test_flipped_byte_in_state_is_refused(snapshot: Path) -> None:
    state_offset = fileformat.HEADER.unpack(snapshot.read_bytes()[: fileformat.HEADER.size])[3]
    _flip(snapshot, state_offset + 5)
    assert "checksum" in _load_error(snapshot)


def test_flipped_byte_in_a_data_chunk_is_refused(snapshot: Path) -> None:
    data_offset = fileformat.layout_regions([("ram0", 0, 8 * MiB)])[0][1]
    _flip(snapshot, data_offset + 600 * PAGE + 17)
    message = _load_error(snapshot)
    assert "data chunk 1" in message and "corrupted" in message


def test_flipped_byte_in_the_bitmap_is_refused(snapshot: Path) -> None:
    bitmap_offset = fileformat.layout_regions([("ram0", 0, 8 * MiB)])[0][0]
    _flip(snapshot, bitmap_offset + 3)
    assert "bitmap" in _load_error(snapshot)


def test_wrong_magic_and_version_are_refused(snapshot: Path) -> None:
    data = bytearray(snapshot.read_bytes())
    bad_magic = snapshot.with_name("magic")
    bad_magic.write_bytes(b"QEVM" + bytes(data[4:]))
    assert "wrong magic" in _load_error(bad_magic)
    data[8:12] = (2).to_bytes(4, "little")
    snapshot.write_bytes(bytes(data))
    assert "version 2 is not supported" in _load_error(snapshot)


def test_other_memory_size_is_refused(snapshot: Path) -> None:
    region = _region(16 * MiB)
    try:
        with pytest.raises(SnapshotFileError, match="give the same --memory"):
            _load(snapshot, region)
    finally:
        region.close()
