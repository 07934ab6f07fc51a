"""Every balloon bad-input case of docs/HOSTILE-INPUT.md, and property tests feeding random buffers to each queue.

The promises: the device completes the request or marks itself broken (DEVICE_NEEDS_RESET), never raises
out of the transport, never discards memory outside the balloon's RAM, never leaks a descriptor head.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor.devices.balloon import BalloonDevice, BalloonError
from memvisor.devices.balloon.constants import CMD_ID, MAX_STATS_BYTES, QueueRole
from memvisor.devices.balloon.testing import (
    RAM_GPA,
    RAM_PFN,
    RAM_SIZE,
    RINGS_SIZE,
    TOTAL_RAM,
    BalloonDriver,
    MiB,
    balloon_memory,
    pfn_array,
    stats_buffer,
)
from memvisor.memory.guest_memory import GuestMemory
from memvisor.virtio.queue import VIRTQ_DESC_F_NEXT

CANARY = 0x600000  # a page of the rings region the balloon must never touch (it is excluded below)


def only_ram(region) -> bool:
    return region.name == "ram"


def make(memory: GuestMemory, **options) -> tuple[BalloonDevice, BalloonDriver]:
    memory.write(CANARY, b"\xc3" * 4096)
    device = BalloonDevice(TOTAL_RAM, region_filter=only_ram, free_page_hint=True, free_page_reporting=True,
                           **options)
    return device, BalloonDriver(device, memory)


def assert_no_leak(device: BalloonDevice, driver: BalloonDriver) -> None:
    """Every chain the driver published came back, except the one stats buffer the device holds."""
    for role, queue in device._queues.items():
        held = 1 if role is QueueRole.STATS and device._stats_head is not None else 0
        assert sum(queue.in_flight.values()) == held, role
        assert driver.queues[role].used_idx() == queue.last_avail_idx - held or role is QueueRole.STATS


@pytest.fixture
def memory():
    mem = balloon_memory()
    yield mem
    mem.close()


def test_write_only_inflate_buffer_completes_and_discards_nothing(memory):
    device, driver = make(memory)
    memory.write(RAM_GPA, b"\x99" * 4096)
    queue = driver.queues[QueueRole.INFLATE]
    head = queue.add_buffer([], [1024])  # device-writable: not PFNs the device may read
    queue.kick()
    assert queue.get_used() == [(head, 0, b"")]
    assert device.counters["errors"] == 1 and device.counters["pages_inflated"] == 0
    assert memory.read(RAM_GPA, 4) == b"\x99" * 4
    assert not driver.broken
    assert_no_leak(device, driver)


def test_odd_length_inflate_uses_the_whole_pfns_only(memory):
    device, driver = make(memory)
    data = pfn_array(range(RAM_PFN, RAM_PFN + 3)) + b"\x01\x02"
    used = driver.send(QueueRole.INFLATE, [data])
    assert [w for _, w, _ in used] == [0]
    assert device.inflated_pages() == 3 and device.counters["errors"] == 1
    assert_no_leak(device, driver)


def test_more_than_256_pfns_inflates_the_first_256(memory):
    device, driver = make(memory)
    memory.write(RAM_GPA + 256 * 4096, b"\x77" * 4096)
    used = driver.inflate(range(RAM_PFN, RAM_PFN + 300))
    assert len(used) == 1
    assert device.inflated_pages() == 256 and device.counters["errors"] == 1
    assert memory.read(RAM_GPA + 256 * 4096, 4) == b"\x77" * 4  # PFN 257 of the buffer was not acted on
    assert_no_leak(device, driver)


def test_pfns_split_over_several_descriptors_are_read_in_order(memory):
    device, driver = make(memory)
    pfns = pfn_array(range(RAM_PFN, RAM_PFN + 8))
    driver.send(QueueRole.INFLATE, [pfns[:6], pfns[6:20], pfns[20:]])  # a PFN straddles two buffers
    assert device.inflated_ranges() == [(RAM_GPA, 8 * 4096)]


def test_pfns_outside_ram_are_ignored_and_the_request_completes(memory):
    device, driver = make(memory)
    hole = (RINGS_SIZE >> 12) + 5
    beyond = (RAM_GPA + RAM_SIZE) >> 12
    ring_page = CANARY >> 12
    used = driver.inflate([0xFFFF_FFFF, hole, beyond, ring_page, RAM_PFN])
    assert len(used) == 1
    assert device.counters["errors"] == 4 and device.counters["pages_inflated"] == 1
    assert memory.read(CANARY, 4096) == b"\xc3" * 4096
    driver.deflate([0xFFFF_FFFF, RAM_PFN])
    assert device.counters["pages_deflated"] == 1 and device.inflated_pages() == 0
    assert not driver.broken
    assert_no_leak(device, driver)


def test_empty_and_indirect_inflate_buffers(memory):
    device = BalloonDevice(TOTAL_RAM, region_filter=only_ram)
    driver = BalloonDriver(device, memory, indirect=True)
    queue = driver.queues[QueueRole.INFLATE]
    queue.add_buffer([pfn_array(range(RAM_PFN, RAM_PFN + 4))], [], indirect=True)
    queue.add_buffer([b""], [])
    queue.kick()
    assert len(queue.get_used()) == 2
    assert device.inflated_pages() == 4 and device.counters["errors"] == 1
    assert_no_leak(device, driver)


def test_descriptor_loop_is_answered_untouched(memory):
    device, driver = make(memory)
    memory.write(RAM_GPA, b"\x12" * 4096)
    queue = driver.queues[QueueRole.INFLATE]
    queue.write_desc(0, RAM_GPA, 4, VIRTQ_DESC_F_NEXT, 0)
    queue.write_desc(1, RAM_GPA + RAM_SIZE - 4, 16, 0, 0)  # a buffer running out of guest RAM
    queue.publish(0)
    queue.publish(1)
    queue.kick()
    assert [head for head, _, _ in queue.get_used()] == [0, 1]
    assert device.counters["errors"] == 2 and device.counters["pages_inflated"] == 0
    assert memory.read(RAM_GPA, 4) == b"\x12" * 4
    assert not driver.broken
    assert_no_leak(device, driver)


def test_available_index_running_ahead_marks_the_device_broken_without_raising(memory):
    device, driver = make(memory)
    queue = driver.queues[QueueRole.INFLATE]
    queue.set_avail_idx(queue.size + 1)
    queue.kick()  # the transport catches BalloonError
    assert driver.broken
    with pytest.raises(BalloonError):  # what the transport caught
        device.notify(0)
    device.notify(99)  # a queue the balloon does not have: nothing


def test_oversized_stats_buffer_is_read_up_to_the_limit(memory):
    device, driver = make(memory)
    assert device.request_stats()
    entries = [(4, 7)] * (MAX_STATS_BYTES // 10 + 50) + [(5, 1)]  # the last entry is past the limit
    assert driver.refill_stats(entries)
    values = device.guest_stats()["stats"]
    assert values["stat-free-memory"] == 7 and values["stat-total-memory"] == -1
    assert device.counters["errors"] >= 1
    assert_no_leak(device, driver)


def test_repeated_stats_buffers_give_the_older_one_back(memory):
    device, driver = make(memory)
    queue = driver.queues[QueueRole.STATS]
    for value in (1, 2, 3):
        queue.add_buffer([stats_buffer([(4, value)])], [])
        queue.kick()
    assert len(queue.get_used()) == 3  # the first (from init) and two of these three
    assert device.guest_stats()["stats"]["stat-free-memory"] == 3
    assert device.counters["errors"] == 3
    assert sum(device._queues[QueueRole.STATS].in_flight.values()) == 1
    assert device.request_stats() and len(queue.get_used()) == 1
    assert_no_leak(device, driver)


def test_stats_buffer_with_writable_part_and_unknown_tags(memory):
    device, driver = make(memory)
    device.request_stats()
    queue = driver.queues[QueueRole.STATS]
    queue.get_used()
    queue.add_buffer([stats_buffer([(200, 1), (6, 66)])], [16])
    queue.kick()
    assert device.guest_stats()["stats"]["stat-available-memory"] == 66
    assert device.counters["stats_unknown_tags"] == 1 and device.counters["errors"] == 1
    assert device.request_stats()
    assert [w for _, w, _ in queue.get_used()] == [0]  # nothing written into the guest's buffer


def test_bad_cmd_id_buffers_complete(memory):
    device, driver = make(memory)
    cmd_id = device.start_hinting()
    memory.write(0x700000, CMD_ID.pack(cmd_id) + b"\x00" * 4)
    for length in (3, 8):
        driver.raw_chain(QueueRole.FREE_PAGE, [(0x700000, length, False)])
    driver.queues[QueueRole.FREE_PAGE].kick()
    assert len(driver.queues[QueueRole.FREE_PAGE].get_used()) == 2
    assert device.counters["errors"] == 2
    assert not driver.broken
    assert_no_leak(device, driver)


# --- property tests --------------------------------------------------------------------------------

ADDRESSES = st.one_of(
    st.integers(RAM_GPA - 8192, RAM_GPA + RAM_SIZE + 8192),
    st.integers(0x700000, 0x7FFFFF),  # scratch in the rings region
    st.integers(0, 2**64 - 1),
)
DESCRIPTORS = st.lists(st.tuples(ADDRESSES, st.integers(0, 3 * MiB), st.booleans()), min_size=1, max_size=6)
ROLES = st.sampled_from(list(QueueRole))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(role=ROLES, chains=st.lists(DESCRIPTORS, min_size=1, max_size=4), content=st.binary(max_size=2048),
       active_hint=st.booleans())
def test_random_chains_on_any_queue_never_raise_or_leak(role, chains, content, active_hint):
    memory = balloon_memory()
    try:
        device, driver = make(memory)
        if active_hint:
            driver.send_cmd_id(device.start_hinting(), 0x7FF000)
        memory.write(0x700000, content)
        queue = driver.queues[role]
        for descs in chains:
            driver.raw_chain(role, descs)
        queue.kick()
        assert memory.read(CANARY, 4096) == b"\xc3" * 4096
        if not driver.broken:
            assert_no_leak(device, driver)
        # whatever happened, the host API still works
        device.guest_stats()
        device.request_stats()
        device.hinted_pages()
    finally:
        memory.close()


PFNS = st.lists(st.one_of(st.integers(RAM_PFN - 64, RAM_PFN + (RAM_SIZE >> 12) + 64), st.integers(0, 2**32 - 1)),
                max_size=300)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inflate=PFNS, deflate=PFNS, tail=st.binary(max_size=3))
def test_random_pfn_buffers_keep_the_bitmap_exact(inflate, deflate, tail):
    memory = balloon_memory()
    try:
        device, driver = make(memory)
        driver.send(QueueRole.INFLATE, [pfn_array(inflate) + tail])
        driver.send(QueueRole.DEFLATE, [pfn_array(deflate) + tail])
        ram = set(range(RAM_PFN, RAM_PFN + (RAM_SIZE >> 12)))
        expected = (set(inflate[:256]) & ram) - (set(deflate[:256]) & ram)
        assert device.inflated_pages() == len(expected)
        got = {first + i for gpa, length in device.inflated_ranges()
               for first in [gpa >> 12] for i in range(length >> 12)}
        assert got == expected
        assert memory.read(CANARY, 4096) == b"\xc3" * 4096
        assert not driver.broken
        assert_no_leak(device, driver)
    finally:
        memory.close()


@settings(max_examples=60, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(-10, 2**40), st.integers(-10, 2**30)), max_size=8))
def test_clear_hinted_takes_any_ranges(ranges):
    memory = balloon_memory()
    try:
        device, driver = make(memory)
        driver.send_cmd_id(device.start_hinting(), 0x7FF000)
        driver.hint([(RAM_GPA, 4 * MiB)])
        before = int(device.hinted_pages().sum())
        dropped = device.clear_hinted(ranges)
        assert int(device.hinted_pages().sum()) == before - dropped
        assert device.clear_hinted(np.ones(3, dtype=bool)) == 0
    finally:
        memory.close()


def test_config_writes_of_random_bytes_never_raise(memory):
    device, driver = make(memory)
    rng = np.random.default_rng(7)
    for _ in range(200):
        offset = int(rng.integers(0, 0x100))
        width = int(rng.choice([1, 2, 4, 8]))
        driver.virtio.write_config(offset, rng.bytes(width))
        driver.virtio.read_config(offset % 16, 4)
    assert not driver.broken
    assert struct.unpack("<I", device.read_config(4, 4))[0] == device.actual
