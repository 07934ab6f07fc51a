"""GuestMemory and MemoryRegion: checked access, backings, discard that really frees memory."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.errors import MemvisorError
from memvisor.memory.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion
from memvisor.memory.libc import PAGE_SIZE

MIB = 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """Two regions with a gap: RAM [0, 4M) memfd, [8M, 10M) private anonymous."""
    memory = GuestMemory([MemoryRegion.memfd(0, 4 * MIB, "ram"), MemoryRegion.anonymous(8 * MIB, 2 * MIB, "anon")])
    yield memory
    memory.close()


def test_read_write_round_trip_little_endian(mem: GuestMemory) -> None:
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u16(0x2000, 0x1234)
    mem.write_u32(0x2004, 0xDEADBEEF)
    mem.write_u64(0x2008, 0x0102030405060708)
    mem.write_u8(0x2010, 0x1FF)  # truncated to a byte
    assert mem.read(0x2000, 2) == b"\x34\x12"
    assert mem.read(0x2004, 4) == b"\xef\xbe\xad\xde"
    assert mem.read_u16(0x2000) == 0x1234
    assert mem.read_u32(0x2004) == 0xDEADBEEF
    assert mem.read_u64(0x2008) == 0x0102030405060708
    assert mem.read_u8(0x2010) == 0xFF
    mem.write(8 * MIB + 5, b"anon")
    assert mem.read(8 * MIB + 5, 4) == b"anon"


def test_fresh_memory_reads_zero(mem: GuestMemory) -> None:
    assert mem.read(4 * MIB - 16, 16) == bytes(16)
    assert mem.read(10 * MIB - 8, 8) == bytes(8)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (-1, 1),  # negative address
        (0, -1),  # negative length
        (4 * MIB, 1),  # just past the first region
        (4 * MIB - 2, 4),  # runs past the end of a region
        (6 * MIB, 4),  # in the gap
        (2**64 - 4, 8),  # wraps past 2**64
        (2**64, 1),  # beyond the address space
        (8 * MIB - 4, 8),  # starts in the gap, ends inside the next region
        (0, 11 * MIB),  # spans everything
    ],
)
def test_accesses_outside_guest_ram_fail(mem: GuestMemory, gpa: int, length: int) -> None:
    assert not mem.contains(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    if length >= 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, bytes(length))


def test_access_spanning_two_adjacent_regions_fails() -> None:
    with GuestMemory([MemoryRegion.memfd(0, MIB, "a"), MemoryRegion.memfd(MIB, MIB, "b")]) as mem:
        assert mem.contains(MIB - 4, 4) and mem.contains(MIB, 4)
        assert not mem.contains(MIB - 4, 8)
        with pytest.raises(GuestMemoryError):
            mem.read(MIB - 4, 8)
        with pytest.raises(GuestMemoryError):
            mem.write_u64(MIB - 4, 1)
        with pytest.raises(GuestMemoryError):
            mem.read_u32(MIB - 2)
        assert mem.region_at(MIB - 1).name == "a"
        assert mem.region_at(MIB).name == "b"


def test_region_at_and_contains(mem: GuestMemory) -> None:
    assert mem.region_at(0).name == "ram"
    assert mem.region_at(9 * MIB).name == "anon"
    assert mem.region_at(9 * MIB).fd is None
    assert mem.region_at(0).fd is not None
    for gpa in (-5, 5 * MIB, 10 * MIB, 2**70):
        with pytest.raises(GuestMemoryError):
            mem.region_at(gpa)
    assert mem.contains(0, 4 * MIB)
    assert mem.contains(4 * MIB - 1, 1)
    assert mem.total_size == 6 * MIB


def test_overlapping_regions_are_refused(mem: GuestMemory) -> None:
    extra = MemoryRegion.memfd(3 * MIB, 2 * MIB, "overlap")
    with pytest.raises(MemvisorError, match="overlaps"):
        mem.add(extra)
    extra.close()


def test_regions_sorted_and_removable() -> None:
    high = MemoryRegion.memfd(16 * MIB, MIB, "high")
    low = MemoryRegion.memfd(0, MIB, "low")
    mem = GuestMemory([high, low])
    assert [r.name for r in mem.regions] == ["low", "high"]
    mem.remove(high)
    assert not mem.contains(16 * MIB, 1)
    high.close()
    mem.close()


@pytest.mark.parametrize(("gpa", "size"), [(0, 0), (0, 100), (123, PAGE_SIZE), (-PAGE_SIZE, PAGE_SIZE),
                                           (2**64 - PAGE_SIZE, 2 * PAGE_SIZE)])
def test_bad_region_layouts_are_refused(gpa: int, size: int) -> None:
    with pytest.raises(MemvisorError):
        MemoryRegion.memfd(gpa, size, "bad")
    with pytest.raises(MemvisorError):
        MemoryRegion.anonymous(gpa, size, "bad")


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    view = mem.view(0x3000, 8)
    view[0:4] = b"abcd"
    assert mem.read(0x3000, 4) == b"abcd"
    mem.write(0x3004, b"efgh")
    assert bytes(view) == b"abcdefgh"
    assert view.format == "B" and not view.readonly
    assert mem.host_address(0x3000, 8) == mem.regions[0].host_addr + 0x3000


def test_read_only_file_region(tmp_path: Path) -> None:
    path = tmp_path / "image"
    content = os.urandom(2 * PAGE_SIZE)
    path.write_bytes(content)
    region = MemoryRegion.file(0x100000, path, 2 * PAGE_SIZE, readonly=True, name="pmem")
    with GuestMemory([region]) as mem:
        assert region.host_addr != 0 and region.readonly
        assert mem.read(0x100000, len(content)) == content
        with pytest.raises(GuestMemoryError, match="read-only"):
            mem.write(0x100000, b"x")
        with pytest.raises(GuestMemoryError):
            mem.write_u32(0x100010, 7)
        with pytest.raises(GuestMemoryError):
            mem.discard(0x100000, PAGE_SIZE)
        view = mem.view(0x100000, 16)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0:1] = b"y"
    assert path.read_bytes() == content


def test_writable_file_region_writes_through_and_grows(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(b"start")
    region = MemoryRegion.file(0, path, 4 * PAGE_SIZE)
    assert region.name == "disk"
    with GuestMemory([region]) as mem:
        assert mem.read(0, 5) == b"start"
        mem.write(PAGE_SIZE, b"written")
    data = path.read_bytes()
    assert len(data) == 4 * PAGE_SIZE
    assert data[PAGE_SIZE:PAGE_SIZE + 7] == b"written"


def test_file_region_sizes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(PAGE_SIZE))
    whole = MemoryRegion.file(0, path, readonly=True)
    assert whole.size == PAGE_SIZE
    whole.close()
    with pytest.raises(MemvisorError, match="fewer"):
        MemoryRegion.file(0, path, 2 * PAGE_SIZE, readonly=True)
    with pytest.raises(MemvisorError, match="cannot open"):
        MemoryRegion.file(0, tmp_path / "missing", PAGE_SIZE)
    with pytest.raises(MemvisorError):
        MemoryRegion.file(0, path, 100)


def _touch(mem: GuestMemory, gpa: int, length: int) -> None:
    mem.write(gpa, os.urandom(length))


def test_discard_releases_memfd_memory() -> None:
    with GuestMemory([MemoryRegion.memfd(0, 16 * MIB, "ram")]) as mem:
        assert mem.allocated_bytes() == 0
        _touch(mem, 0, 8 * MIB)
        touched = mem.allocated_bytes()
        assert touched >= 8 * MIB
        mem.discard(2 * MIB, 4 * MIB)
        assert mem.allocated_bytes() <= touched - 4 * MIB
        assert mem.read(2 * MIB, 4 * MIB) == bytes(4 * MIB)
        assert mem.read(MIB, 1) != b"" and mem.allocated_bytes(mem.regions[0]) >= 4 * MIB


def test_discard_releases_anonymous_memory() -> None:
    with GuestMemory([MemoryRegion.anonymous(0, 8 * MIB, "anon")]) as mem:
        before = mem.allocated_bytes()
        _touch(mem, 0, 8 * MIB)
        assert mem.allocated_bytes() >= before + 8 * MIB - PAGE_SIZE
        mem.discard(0, 6 * MIB)
        assert mem.allocated_bytes() <= 2 * MIB + PAGE_SIZE
        assert mem.read(0, 6 * MIB) == bytes(6 * MIB)


def test_discard_punches_hole_in_file(tmp_path: Path) -> None:
    path = tmp_path / "backing"
    path.touch()
    with GuestMemory([MemoryRegion.file(0, path, 4 * MIB)]) as mem:
        _touch(mem, 0, 4 * MIB)
        os.fsync(mem.regions[0].fd or 0)
        before = mem.allocated_bytes()
        try:
            mem.discard(0, 2 * MIB)
        except GuestMemoryError as err:  # a file system without hole punching
            pytest.skip(str(err))
        assert mem.allocated_bytes() <= before - 2 * MIB
        assert mem.read(0, 2 * MIB) == bytes(2 * MIB)
    assert path.stat().st_size == 4 * MIB


def test_held_ranges_are_the_memfd_outside_its_holes() -> None:
    with GuestMemory([MemoryRegion.memfd(0, 4 * MIB, "ram")]) as mem:
        region = mem.regions[0]
        assert region.held_ranges(0, 4 * MIB) == []
        mem.write(3 * PAGE_SIZE + 7, b"x")
        mem.write(7 * PAGE_SIZE, b"y" * (3 * PAGE_SIZE))
        assert region.held_ranges(0, 4 * MIB) == [(3 * PAGE_SIZE, 4 * PAGE_SIZE), (7 * PAGE_SIZE, 10 * PAGE_SIZE)]
        assert region.held_ranges(3 * PAGE_SIZE + 5, 10) == [(3 * PAGE_SIZE + 5, 3 * PAGE_SIZE + 15)]
        assert region.held_ranges(8 * PAGE_SIZE, 4 * MIB - 8 * PAGE_SIZE) == [(8 * PAGE_SIZE, 10 * PAGE_SIZE)]
        assert region.held_ranges(4 * PAGE_SIZE, 3 * PAGE_SIZE) == []
    with GuestMemory([MemoryRegion.anonymous(0, MIB, "anon")]) as mem:
        assert mem.regions[0].held_ranges(5, 100) == [(5, 105)]  # private memory: all of it, as far as it knows


def test_zero_clears_what_the_host_holds_and_allocates_nothing_more() -> None:
    with GuestMemory([MemoryRegion.memfd(0, 16 * MIB, "ram")]) as mem:
        _touch(mem, 0, 2 * MIB)
        mem.write(9 * MIB + 100, b"left over from before a reboot")
        held = mem.allocated_bytes()
        marked: list[tuple[int, int]] = []
        mem.on_write = lambda gpa, length: marked.append((gpa, length))
        mem.zero(MIB + 3, 12 * MIB)
        assert mem.allocated_bytes() == held  # the holes stayed holes
        assert marked == [(MIB + 3, 12 * MIB)]  # the dirty tracker hears of all of it
        assert mem.read(MIB + 3, 12 * MIB) == bytes(12 * MIB)
        assert mem.read(MIB, 3) != bytes(3)  # the bytes before the range are kept
        _touch(mem, 13 * MIB + 3, 1)  # and those after it
        mem.zero(13 * MIB + 3, 0)
        assert mem.read(13 * MIB + 3, 1) != bytes(1)


def test_zero_of_private_and_read_only_memory(tmp_path: Path) -> None:
    with GuestMemory([MemoryRegion.anonymous(0, MIB, "anon")]) as mem:
        _touch(mem, 0, MIB)
        mem.zero(100, MIB - 200)
        assert mem.read(100, MIB - 200) == bytes(MIB - 200) and mem.read(0, 100) != bytes(100)
    path = tmp_path / "image"
    path.write_bytes(b"\xff" * MIB)
    with GuestMemory([MemoryRegion.file(0, path, readonly=True)]) as mem:
        with pytest.raises(GuestMemoryError, match="read-only region"):
            mem.zero(0, PAGE_SIZE)
        assert mem.read(0, PAGE_SIZE) == b"\xff" * PAGE_SIZE


@pytest.mark.parametrize(("gpa", "length"), [(1, PAGE_SIZE), (0, PAGE_SIZE + 1), (4 * MIB, PAGE_SIZE),
                                             (4 * MIB - PAGE_SIZE, 2 * PAGE_SIZE), (-PAGE_SIZE, PAGE_SIZE)])
def test_bad_discards_fail(mem: GuestMemory, gpa: int, length: int) -> None:
    mem.write(0, b"keep")
    with pytest.raises(GuestMemoryError):
        mem.discard(gpa, length)
    assert mem.read(0, 4) == b"keep"


def test_discard_of_nothing_is_allowed(mem: GuestMemory) -> None:
    mem.write(0, b"keep")
    mem.discard(0, 0)
    assert mem.read(0, 4) == b"keep"


def test_closed_memory_refuses_access() -> None:
    region = MemoryRegion.memfd(0, MIB, "ram")
    mem = GuestMemory([region])
    mem.close()
    region.close()  # twice is harmless
    assert region.allocated_bytes() == 0
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)
    assert "ram" in repr(region)


@settings(max_examples=300, deadline=None)
@given(gpa=st.one_of(st.integers(-2**65, 2**65), st.integers(0, 12 * MIB)),
       length=st.one_of(st.integers(-16, 2**65), st.integers(0, 64)))
def test_random_ranges_are_checked_exactly(gpa: int, length: int) -> None:
    mem = _SHARED_MEMORY
    # The start address must lie in a region (so a zero-length range at a region's end is outside).
    inside = length >= 0 and any(r.gpa <= gpa < r.end and gpa + length <= r.end for r in mem.regions)
    assert mem.contains(gpa, length) == inside
    if inside and length <= 64:
        assert len(mem.read(gpa, length)) == length
    elif not inside:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)


_SHARED_MEMORY = GuestMemory([MemoryRegion.memfd(0, 4 * MIB, "ram"), MemoryRegion.anonymous(8 * MIB, 2 * MIB)])
