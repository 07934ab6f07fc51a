"""The split virtqueue parser against a driver that writes real (and hostile) rings into guest memory."""

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio.queue import (
    DESC,
    MAX_INDIRECT_DESCRIPTORS,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    SplitVirtqueue,
    VirtqueueError,
    avail_ring_size,
    used_ring_size,
)
from memvisor.virtio.testing import DriverQueue, GuestAllocator, standalone_queue, test_memory

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
MIB = 1 << 20
RAM = 16 * MIB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = test_memory()
    yield mem
    mem.close()


@pytest.fixture
def queues(memory: GuestMemory) -> tuple[DriverQueue, SplitVirtqueue]:
    return standalone_queue(8, memory)


def _buffer(dq: DriverQueue, data: bytes = b"", size: int = 0) -> int:
    addr = dq.driver.allocator.alloc(max(len(data), size))
    dq.memory.write(addr, data)
    return addr


def _expect_error(sq: SplitVirtqueue, match: str, head: int | None = 0) -> VirtqueueError:
    """pop() fails naming `head`; the device can still return that head to the driver."""
    with pytest.raises(VirtqueueError, match=match) as info:
        sq.pop()
    assert info.value.head == head
    if head is not None and head < sq.size:
        assert sq.in_flight[head] == 1
        sq.push_used(head, 0)
        assert not sq.in_flight
    return info.value


# --- well-formed chains ---------------------------------------------------------------------------

def test_chain_round_trip(memory: GuestMemory, queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    head = dq.add_buffer([b"hello ", b"world"], [3, 5])
    assert sq.available() == 1
    chain = sq.pop()
    assert chain is not None and chain.head == head
    assert [d.length for d in chain.readable] == [6, 5]
    assert [d.length for d in chain.writable] == [3, 5]
    assert all(d.write_only for d in chain.writable) and not any(d.write_only for d in chain.readable)
    assert chain.readable_length == 11 and chain.readable_length() == 11
    assert chain.writable_length == 8 and chain.writable_length() == 8
    assert chain.read_all(memory, 100) == b"hello world"
    assert chain.read_all(memory, 7) == b"hello w"
    assert chain.read_all(memory, 0) == b""
    assert chain.write_all(memory, b"ABCDEFGHIJ") == 8  # only what fits
    sq.push_used(chain.head, 8)
    assert dq.get_used() == [(head, 8, b"ABCDEFGH")]
    assert sq.pop() is None
    assert not sq.in_flight
    assert "head=" in repr(chain) and "size=8" in repr(sq)


def test_write_all_partial(memory: GuestMemory, queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    head = dq.add_buffer([], [4, 4])
    chain = sq.pop()
    assert chain is not None
    assert chain.write_all(memory, b"xyz") == 3
    assert chain.write_all(memory, bytearray(b"12345")) == 5
    sq.push_used(head, 5)
    assert dq.get_used() == [(head, 5, b"12345")]


def test_many_chains_and_index_wrap(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.set_avail_idx(0xFFFD)
    sq.last_avail_idx = 0xFFFD
    sq.next_used_idx = dq.last_used_idx = 0xFFFD
    dq.memory.write_u16(dq.used_addr + 2, 0xFFFD)
    for round_ in range(3):
        heads = [dq.add_buffer([bytes([round_, i])], [1]) for i in range(4)]
        popped = []
        while (chain := sq.pop()) is not None:
            popped.append(chain.head)
            sq.push_used(chain.head, 1)
        assert popped == heads
        assert [h for h, _, _ in dq.get_used()] == heads
    assert sq.last_avail_idx == (0xFFFD + 12) & 0xFFFF


def test_full_queue_exactly_size_ahead(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    for i in range(8):
        dq.add_buffer([bytes([i])], [])
    assert sq.available() == 8
    assert [sq.pop() is not None for _ in range(8)] == [True] * 8
    assert sq.pop() is None


def test_indirect_chain(memory: GuestMemory, queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    head = dq.add_buffer([b"in", b"direct"], [2, 2], indirect=True)
    chain = sq.pop()
    assert chain is not None and chain.head == head
    assert chain.read_all(memory, 100) == b"indirect"
    assert len(chain.writable) == 2
    chain.write_all(memory, b"okok")
    sq.push_used(head, 4)
    assert dq.get_used() == [(head, 4, b"okok")]


def test_direct_descriptors_followed_by_indirect(memory: GuestMemory,
                                                 queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    """virtio 1.2 section 2.7.5.3.2: zero or more chained descriptors, then one indirect one."""
    dq, sq = queues
    table = dq.driver.allocator.alloc(32)
    memory.write(table, DESC.pack(_buffer(dq, b"BB"), 2, NEXT, 1) + DESC.pack(_buffer(dq, size=4), 4, WRITE, 0))
    dq.write_desc(0, _buffer(dq, b"AA"), 2, NEXT, 1)
    dq.write_desc(1, table, 32, INDIRECT | WRITE, 0)  # the write flag of an indirect descriptor is ignored
    dq.publish(0)
    chain = sq.pop()
    assert chain is not None
    assert chain.read_all(memory, 10) == b"AABB"
    assert chain.writable_length == 4


def test_zero_length_descriptor_touches_nothing(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.write_desc(0, 2**64 - 1, 0, NEXT, 1)
    dq.write_desc(1, _buffer(dq, b"x"), 1, 0)
    dq.publish(0)
    chain = sq.pop()
    assert chain is not None and len(chain.readable) == 1 and chain.readable[0].length == 1
    assert chain.read_all(dq.memory, 10) == b"x"


def test_descriptors_are_copied_once(memory: GuestMemory, queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    """A driver rewriting the table after the check cannot change what the device uses."""
    dq, sq = queues
    good = _buffer(dq, b"good")
    dq.write_desc(0, good, 4, 0)
    dq.publish(0)
    chain = sq.pop()
    assert chain is not None
    dq.write_desc(0, 2**63, 4096, WRITE)  # hostile rewrite after the pop
    assert chain.readable == [Descriptor(good, 4, False)]
    assert chain.read_all(memory, 4) == b"good"


def test_duplicate_heads_are_tracked(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.write_desc(3, _buffer(dq, b"d"), 1, 0)
    dq.publish(3)
    dq.publish(3)
    assert sq.pop() is not None and sq.pop() is not None
    assert sq.in_flight[3] == 2
    sq.push_used(3, 0)
    sq.push_used(3, 0)
    assert not sq.in_flight
    with pytest.raises(VirtqueueError, match="not popped"):
        sq.push_used(3, 0)


# --- hostile chains -------------------------------------------------------------------------------

def test_descriptor_loop(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    buf = _buffer(dq, b"loop")
    dq.write_desc(0, buf, 4, NEXT, 1)
    dq.write_desc(1, buf, 4, NEXT, 0)
    dq.publish(0)
    _expect_error(sq, "more than 8 descriptors")


def test_self_loop(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.write_desc(5, _buffer(dq, b"x"), 1, NEXT, 5)
    dq.publish(5)
    _expect_error(sq, "more than", head=5)


def test_chain_of_queue_size_is_allowed(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    buf = _buffer(dq, b"z")
    for i in range(8):
        dq.write_desc(i, buf, 1, NEXT if i < 7 else 0, i + 1)
    dq.publish(0)
    chain = sq.pop()
    assert chain is not None and len(chain.readable) == 8


def test_next_out_of_range(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.write_desc(0, _buffer(dq, b"x"), 1, NEXT, 8)
    dq.publish(0)
    _expect_error(sq, "next 8 is out of range")


def test_head_out_of_range(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.publish(200)
    _expect_error(sq, "head 200 is out of range", head=200)
    assert not sq.in_flight


@pytest.mark.parametrize(("addr", "length"), [
    (RAM - 2, 4),  # runs past the end of RAM
    (RAM, 1),  # just outside
    (2**64 - 8, 16),  # wraps past 2**64
    (2**64 - 1, 2**32 - 1),
    (0x4000_0000, 4096),  # far outside
])
def test_buffer_outside_guest_ram(queues: tuple[DriverQueue, SplitVirtqueue], addr: int, length: int) -> None:
    dq, sq = queues
    dq.write_desc(0, addr, length, 0)
    dq.publish(0)
    _expect_error(sq, "outside guest RAM")


def test_buffer_spanning_two_regions() -> None:
    memory = GuestMemory([MemoryRegion.memfd(0, 8 * MIB, "a"), MemoryRegion.memfd(8 * MIB, MIB, "b")])
    dq, sq = standalone_queue(8, memory)
    dq.write_desc(0, 8 * MIB - 8, 16, 0)
    dq.publish(0)
    _expect_error(sq, "outside guest RAM")
    memory.close()


def test_writable_buffer_in_read_only_memory(tmp_path: object) -> None:
    import pathlib
    path = pathlib.Path(str(tmp_path)) / "ro"
    path.write_bytes(bytes(MIB))
    memory = test_memory()
    memory.add(MemoryRegion.file(32 * MIB, path, MIB, readonly=True))
    dq, sq = standalone_queue(8, memory)
    dq.write_desc(0, 32 * MIB, 64, 0, 0)  # reading from it is fine
    dq.publish(0)
    assert sq.pop() is not None
    sq.push_used(0, 0)
    dq.write_desc(1, 32 * MIB, 64, WRITE, 0)
    dq.publish(1)
    _expect_error(sq, "read-only", head=1)
    memory.close()


def test_readable_after_writable(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.write_desc(0, _buffer(dq, size=4), 4, WRITE | NEXT, 1)
    dq.write_desc(1, _buffer(dq, b"late"), 4, 0)
    dq.publish(0)
    _expect_error(sq, "readable descriptor after a writable one")


def test_avail_index_too_far_ahead(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.set_avail_idx(9)
    with pytest.raises(VirtqueueError, match="ahead"):
        sq.pop()
    dq.set_avail_idx(0xFFFF)  # "behind" is also far ahead, modulo 2**16
    with pytest.raises(VirtqueueError, match="ahead"):
        sq.available()


def test_indirect_without_feature(memory: GuestMemory) -> None:
    dq, sq = standalone_queue(8, memory, indirect=False)
    dq.add_buffer([b"x"], [], indirect=True)
    _expect_error(sq, "without VIRTIO_F_INDIRECT_DESC")


@pytest.mark.parametrize(("length", "match"), [(0, "multiple of 16"), (24, "multiple of 16"),
                                               (16 * (MAX_INDIRECT_DESCRIPTORS + 1), "over")])
def test_bad_indirect_table_length(queues: tuple[DriverQueue, SplitVirtqueue], length: int, match: str) -> None:
    dq, sq = queues
    dq.write_desc(0, _buffer(dq, size=max(length, 16)), length, INDIRECT)
    dq.publish(0)
    _expect_error(sq, match)


def test_indirect_with_next(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    table = _buffer(dq, DESC.pack(_buffer(dq, b"x"), 1, 0, 0))
    dq.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    dq.write_desc(1, _buffer(dq, b"y"), 1, 0)
    dq.publish(0)
    _expect_error(sq, "both INDIRECT and NEXT")


def test_nested_indirect(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    inner = _buffer(dq, DESC.pack(_buffer(dq, b"x"), 1, 0, 0))
    outer = _buffer(dq, DESC.pack(inner, 16, INDIRECT, 0))
    dq.write_desc(0, outer, 16, INDIRECT)
    dq.publish(0)
    _expect_error(sq, "inside an indirect table")


def test_indirect_table_outside_ram(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    dq.write_desc(0, RAM - 16, 32, INDIRECT)
    dq.publish(0)
    _expect_error(sq, "indirect table")


def test_indirect_loop_and_next_out_of_range(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    buf = _buffer(dq, b"x")
    looping = _buffer(dq, DESC.pack(buf, 1, NEXT, 1) + DESC.pack(buf, 1, NEXT, 0))
    dq.write_desc(0, looping, 32, INDIRECT)
    dq.publish(0)
    _expect_error(sq, "more than 2 descriptors")
    past = _buffer(dq, DESC.pack(buf, 1, NEXT, 2) + DESC.pack(buf, 1, 0, 0))
    dq.write_desc(1, past, 32, INDIRECT)
    dq.publish(1)
    _expect_error(sq, "next 2 is out of range", head=1)


def test_indirect_buffer_outside_ram(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    table = _buffer(dq, DESC.pack(2**64 - 4, 8, 0, 0))
    dq.write_desc(0, table, 16, INDIRECT)
    dq.publish(0)
    _expect_error(sq, "outside guest RAM")


# --- used ring and notifications ------------------------------------------------------------------

def test_push_used_checks(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    head = dq.add_buffer([b"a"], [])
    assert sq.pop() is not None
    for bad_head, written in ((8, 0), (-1, 0), (head, -1), (head, 2**32)):
        with pytest.raises(VirtqueueError):
            sq.push_used(bad_head, written)
    with pytest.raises(VirtqueueError, match="not popped"):
        sq.push_used((head + 1) % 8, 0)
    sq.push_used(head, 0)
    assert dq.get_used() == [(head, 0, b"")]


def test_should_interrupt_honours_no_interrupt_flag(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    assert not sq.should_interrupt()  # nothing used yet
    for suppress in (False, True, False):
        dq.suppress_interrupts(suppress)
        head = dq.add_buffer([b"a"], [])
        assert sq.pop() is not None
        sq.push_used(head, 0)
        assert sq.should_interrupt() is (not suppress)
        assert not sq.should_interrupt()  # nothing new since
        dq.get_used()
    assert VIRTQ_AVAIL_F_NO_INTERRUPT == 1


def test_event_idx(memory: GuestMemory) -> None:
    dq, sq = standalone_queue(8, memory, event_idx=True)
    dq.set_used_event(2)  # interrupt me once used idx passes 2, i.e. after the third buffer
    heads = [dq.add_buffer([bytes([i])], []) for i in range(4)]
    results = []
    for head in heads:
        assert sq.pop() is not None
        sq.push_used(head, 0)
        results.append(sq.should_interrupt())
    assert results == [False, False, True, False]
    assert dq.avail_event() == 4  # the device asks to be kicked for avail index 4
    # Batched: several used entries at once cross used_event in between.
    dq.get_used()  # the helper sets used_event to 4, like Linux
    more = [dq.add_buffer([b"m"], []) for _ in range(3)]
    for head in more:
        assert sq.pop() is not None
        sq.push_used(head, 0)
    assert sq.should_interrupt()


def test_event_idx_with_ring_in_freshly_reset_queue(memory: GuestMemory) -> None:
    dq, sq = standalone_queue(8, memory, event_idx=True)
    head = dq.add_buffer([b"a"], [])
    assert sq.pop() is not None
    sq.push_used(head, 0)
    assert sq.should_interrupt()  # used_event 0 initially: the first buffer interrupts


# --- layout checks --------------------------------------------------------------------------------

def _configured(memory: GuestMemory, size: int = 8, max_size: int = 16) -> SplitVirtqueue:
    alloc = GuestAllocator(memory)
    sq = SplitVirtqueue(0, max_size, memory)
    sq.size = size
    sq.desc_addr = alloc.alloc(16 * size, 16)
    sq.driver_addr = alloc.alloc(avail_ring_size(size), 2)
    sq.device_addr = alloc.alloc(used_ring_size(size), 4)
    return sq


@pytest.mark.parametrize("size", [0, 3, 12, 32, 2**16])
def test_bad_sizes_refused(memory: GuestMemory, size: int) -> None:
    sq = _configured(memory)
    sq.size = size
    with pytest.raises(VirtqueueError, match="power of two"):
        sq.enable()
    assert not sq.ready


@pytest.mark.parametrize(("attr", "value", "match"), [
    ("desc_addr", 0x1008, "aligned"), ("driver_addr", 0x1001, "aligned"), ("device_addr", 0x1002, "aligned"),
    ("desc_addr", RAM - 16, "outside"), ("driver_addr", 2**64 - 2, "outside"), ("device_addr", RAM, "outside"),
])
def test_bad_ring_addresses_refused(memory: GuestMemory, attr: str, value: int, match: str) -> None:
    sq = _configured(memory)
    setattr(sq, attr, value)
    with pytest.raises(VirtqueueError, match=match):
        sq.enable()


def test_used_ring_in_read_only_memory_refused(tmp_path: object) -> None:
    import pathlib
    path = pathlib.Path(str(tmp_path)) / "ro"
    path.write_bytes(bytes(MIB))
    memory = test_memory()
    memory.add(MemoryRegion.file(32 * MIB, path, MIB, readonly=True))
    sq = _configured(memory)
    sq.device_addr = 32 * MIB
    with pytest.raises(VirtqueueError, match="read-only"):
        sq.enable()
    memory.close()


def test_layout_changed_while_ready_is_rechecked(queues: tuple[DriverQueue, SplitVirtqueue]) -> None:
    dq, sq = queues
    sq.desc_addr = RAM  # a transport bug or a direct poke: the next pop re-checks
    with pytest.raises(VirtqueueError, match="outside"):
        sq.pop()


def test_sizes_and_reset(memory: GuestMemory) -> None:
    with pytest.raises(ValueError):
        SplitVirtqueue(0, 0, memory)
    with pytest.raises(ValueError):
        SplitVirtqueue(0, 100, memory)
    sq = _configured(memory, size=4)
    sq.enable()
    assert sq.ready and sq.pop() is None
    sq.reset()
    assert not sq.ready and sq.size == 16 and sq.desc_addr == 0
    assert sq.pop() is None and sq.available() == 0
    assert not sq.should_interrupt()


def test_driver_helper_without_room(memory: GuestMemory) -> None:
    dq, sq = standalone_queue(2, memory)
    from memvisor.virtio.testing import DriverError
    with pytest.raises(DriverError):
        dq.add_buffer([b"a", b"b", b"c"], [])
    with pytest.raises(DriverError):
        dq.add_buffer([], [])


# --- property tests -------------------------------------------------------------------------------

_SIZE = 8
_PROPERTY_MEMORY = GuestMemory([MemoryRegion.memfd(0, 64 * 1024, "ram")])
_DESC_AT, _AVAIL_AT, _USED_AT, _TABLES_AT = 0x0, 0x100, 0x200, 0x1000

_addresses = st.one_of(st.integers(0, 0x10000 + 64), st.integers(0, 2**64 - 1), st.sampled_from([_TABLES_AT]))
_lengths = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 48, 4096]))
_descriptors = st.tuples(_addresses, _lengths, st.integers(0, 7), st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(_descriptors, min_size=_SIZE, max_size=_SIZE),
    indirect=st.lists(_descriptors, min_size=0, max_size=12),
    ring=st.lists(st.one_of(st.integers(0, _SIZE), st.integers(0, 0xFFFF)), min_size=_SIZE, max_size=_SIZE),
    avail_idx=st.one_of(st.integers(0, _SIZE + 1), st.integers(0, 0xFFFF)),
    with_indirect=st.booleans(),
)
def test_random_rings_never_break_the_parser(
    table: list[tuple[int, int, int, int]], indirect: list[tuple[int, int, int, int]], ring: list[int],
    avail_idx: int, with_indirect: bool,
) -> None:
    mem = _PROPERTY_MEMORY
    mem.write(0, bytes(0x10000))
    mem.write(_DESC_AT, b"".join(DESC.pack(*d) for d in table))
    mem.write(_AVAIL_AT, struct.pack(f"<HH{_SIZE}H", 0, avail_idx, *ring))
    mem.write(_TABLES_AT, b"".join(DESC.pack(*d) for d in indirect))
    sq = SplitVirtqueue(0, _SIZE, mem)
    sq.desc_addr, sq.driver_addr, sq.device_addr = _DESC_AT, _AVAIL_AT, _USED_AT
    sq.indirect_desc = with_indirect
    sq.enable()
    limit = _SIZE if not with_indirect else _SIZE - 1 + len(indirect)
    pops = 0
    while True:
        try:
            chain = sq.pop()
        except VirtqueueError:
            break
        if chain is None:
            break
        pops += 1
        assert pops <= _SIZE
        descs = chain.readable + chain.writable
        assert len(descs) <= limit
        for desc in descs:
            assert desc.length == 0 or mem.contains(desc.addr, desc.length)
        chain.read_all(mem, 1 << 20)
        chain.write_all(mem, bytes(chain.writable_length))
        sq.push_used(chain.head, chain.writable_length)
    assert sq.next_used_idx == pops
