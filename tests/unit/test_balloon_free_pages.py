"""Free page hinting (command id rounds) and free page reporting (discard, page poison)."""

from __future__ import annotations

import numpy as np
import pytest

from memvisor.devices.balloon import BalloonDevice, HintState
from memvisor.devices.balloon.constants import (
    CMD_ID_DONE,
    CMD_ID_STOP,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    QueueRole,
)
from memvisor.devices.balloon.hinting import CMD_ID_LIMIT, FreePageHinting
from memvisor.devices.balloon.testing import RAM_GPA, RAM_PFN, TOTAL_RAM, BalloonDriver, MiB, balloon_memory
from memvisor.errors import UsageError
from memvisor.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG

BLOCK = 4 * MiB  # MAX_ORDER-1 block, what Linux 6.1 hints
CMD_AT = 0x700000  # where the test driver keeps its cmd id buffer (rings region)


@pytest.fixture
def memory():
    mem = balloon_memory()
    yield mem
    mem.close()


def hinting_pair(memory):
    device = BalloonDevice(TOTAL_RAM, free_page_hint=True)
    return device, BalloonDriver(device, memory)


def test_full_hinting_cycle(memory):
    device, driver = hinting_pair(memory)
    memory.write(RAM_GPA, b"\x11" * BLOCK)
    allocated = memory.allocated_bytes(memory.regions[1])
    irqs = driver.virtio.irq_count
    cmd_id = device.start_hinting()
    assert cmd_id >= 2
    assert driver.virtio.irq_count == irqs + 1 and driver.virtio.ack_interrupt() & VIRTIO_MMIO_INT_CONFIG
    assert driver.config()[2] == cmd_id
    assert device.hint_state is HintState.REQUESTED
    # the driver echoes the id it read, then sends free blocks
    assert len(driver.send_cmd_id(cmd_id, CMD_AT)) == 1
    assert device.hint_state is HintState.ACTIVE
    used = driver.hint([(RAM_GPA, BLOCK), (RAM_GPA + 2 * BLOCK, BLOCK)])
    assert [written for _, written, _ in used] == [0, 0]
    assert device.counters["hint_pages"] == 2 * BLOCK // 4096
    bitmap = device.hinted_pages()
    assert bitmap.dtype == bool and bitmap.sum() == 2 * BLOCK // 4096
    assert bitmap[RAM_PFN] and not bitmap[RAM_PFN + BLOCK // 4096]
    assert device.hinted_ranges() == [(RAM_GPA, BLOCK), (RAM_GPA + 2 * BLOCK, BLOCK)]
    # hinted pages are recorded, never discarded
    assert memory.read(RAM_GPA, 4) == b"\x11" * 4
    assert memory.allocated_bytes(memory.regions[1]) == allocated
    # host stops: config STOP; the driver answers with a STOP id; late hints are ignored
    device.stop_hinting()
    assert driver.config()[2] == CMD_ID_STOP and device.hint_state is HintState.STOPPED
    driver.send_cmd_id(CMD_ID_STOP, CMD_AT)
    driver.hint([(RAM_GPA + 4 * BLOCK, BLOCK)])
    assert device.counters["hints_ignored"] == 1
    assert device.hinted_pages().sum() == 2 * BLOCK // 4096
    # migration drops pages it saw dirtied
    dirty = np.zeros(RAM_PFN + 10, dtype=bool)
    dirty[RAM_PFN:RAM_PFN + 10] = True
    assert device.clear_hinted(dirty) == 10
    assert device.clear_hinted([(RAM_GPA + 2 * BLOCK + 1, 4096)]) == 2  # a partly touched page counts
    assert device.clear_hinted([(-5, 10), (0, 0)]) == 0
    assert device.hinted_pages().sum() == 2 * BLOCK // 4096 - 12
    device.done_hinting()
    assert driver.config()[2] == CMD_ID_DONE and device.hint_state is HintState.DONE
    # the next round gets a new id and forgets the old hints
    assert device.start_hinting() == cmd_id + 1
    assert device.hinted_pages().sum() == 0
    assert not driver.broken


def test_stale_cmd_id_starts_nothing_and_its_hints_are_ignored(memory):
    device, driver = hinting_pair(memory)
    first = device.start_hinting()
    second = device.start_hinting()
    driver.send_cmd_id(first, CMD_AT)  # the driver was still answering the previous round
    assert device.hint_state is HintState.REQUESTED
    driver.hint([(RAM_GPA, BLOCK)])
    assert device.counters["hint_pages"] == 0 and device.counters["hints_ignored"] == 1
    driver.send_cmd_id(second, CMD_AT)
    driver.hint([(RAM_GPA, BLOCK)])
    assert device.counters["hint_pages"] == BLOCK // 4096
    # a STOP from the guest ends an active round
    driver.send_cmd_id(CMD_ID_STOP, CMD_AT)
    assert device.hint_state is HintState.STOPPED


def test_hint_outside_guest_memory_is_answered_and_counted(memory):
    device, driver = hinting_pair(memory)
    driver.send_cmd_id(device.start_hinting(), CMD_AT)
    used = driver.hint([(0x900000, 4096)])  # in the hole between the regions: the queue refuses the chain
    assert len(used) == 1 and not driver.broken
    assert device.counters["hint_pages"] == 0 and device.counters["errors"] == 1


def test_hint_clipping_and_errors_inside_memory(memory):
    device, driver = hinting_pair(memory)
    driver.send_cmd_id(device.start_hinting(), CMD_AT)
    driver.hint([(RAM_GPA + 100, 8192)])  # only one whole page inside
    assert device.counters["hint_pages"] == 1
    driver.hint([(RAM_GPA + 1, 100)])  # no whole page: nothing recorded, counted as an error
    assert device.counters["errors"] == 1
    assert not driver.broken


def test_hinting_needs_the_feature(memory):
    device = BalloonDevice(TOTAL_RAM, free_page_hint=False)
    BalloonDriver(device, memory)
    for call in (device.start_hinting, device.stop_hinting, device.done_hinting):
        with pytest.raises(UsageError):
            call()


def test_cmd_ids_wrap_back_to_two():
    hinting = FreePageHinting()
    hinting._next_id = CMD_ID_LIMIT - 1
    assert hinting.start() == CMD_ID_LIMIT - 1
    assert hinting.start() == 2
    assert hinting.on_cmd_id(2) and hinting.state is HintState.ACTIVE
    assert hinting.on_hint(0, 4096) is None  # not attached to RAM yet


def reporting_pair(memory, **options):
    poison_val = options.pop("poison_val", None)
    features = options.pop("features", None)
    device = BalloonDevice(TOTAL_RAM, free_page_reporting=True, **options)
    return device, BalloonDriver(device, memory, poison_val=poison_val, features=features)


def test_32_entry_report_discards_memory(memory):
    device, driver = reporting_pair(memory)
    ranges = [(RAM_GPA + i * 2 * MiB, 2 * MiB) for i in range(32)]
    for gpa, length in ranges:
        memory.write(gpa, b"\x5a" * length)
    before = memory.allocated_bytes(memory.regions[1])
    assert before >= 64 * MiB
    used = driver.report(ranges)
    assert [written for _, written, _ in used] == [0]
    assert before - memory.allocated_bytes(memory.regions[1]) == 64 * MiB
    assert memory.read(RAM_GPA + 63 * MiB, 8) == bytes(8)
    c = device.counters
    assert (c["report_requests"], c["pages_reported"], c["bytes_discarded"], c["errors"]) == (1, 16384, 64 * MiB, 0)
    assert not driver.broken


def test_non_zero_poison_forbids_discard(memory):
    device, driver = reporting_pair(memory, poison_val=0xAAAAAAAA)
    assert driver.config()[3] == 0xAAAAAAAA and device.poison_active
    memory.write(RAM_GPA, b"\xaa" * 2 * MiB)
    before = memory.allocated_bytes(memory.regions[1])
    driver.report([(RAM_GPA, 2 * MiB)])
    assert memory.read(RAM_GPA, 4) == b"\xaa" * 4
    assert memory.allocated_bytes(memory.regions[1]) == before
    assert device.counters["pages_reported"] == 512 and device.counters["bytes_discarded"] == 0


def test_zero_poison_or_poison_not_negotiated_still_discards(memory):
    device, driver = reporting_pair(memory, poison_val=0)
    assert not device.poison_active
    memory.write(RAM_GPA, b"\x01" * 2 * MiB)
    driver.report([(RAM_GPA, 2 * MiB)])
    assert device.counters["bytes_discarded"] == 2 * MiB
    # PAGE_POISON not negotiated: a poison_val the driver writes anyway does not count
    memory2 = balloon_memory()
    try:
        features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING) | (1 << VIRTIO_BALLOON_F_STATS_VQ)
        device2, driver2 = reporting_pair(memory2, features=features)
        driver2.virtio.write_config(12, (0xAA).to_bytes(4, "little"))
        assert device2.poison_val == 0xAA and not device2.poison_active
        driver2.report([(RAM_GPA, 2 * MiB)])
        assert device2.counters["bytes_discarded"] == 2 * MiB
    finally:
        memory2.close()


def test_report_with_readable_or_partial_buffers_completes(memory):
    device, driver = reporting_pair(memory)
    memory.write(RAM_GPA, b"\x42" * 4096)
    head = driver.raw_chain(QueueRole.REPORTING, [(RAM_GPA, 4096, False), (RAM_GPA + 4096, 4096, True)])
    driver.queues[QueueRole.REPORTING].kick()
    assert [h for h, _, _ in driver.queues[QueueRole.REPORTING].get_used()] == [head]
    assert memory.read(RAM_GPA, 4) == b"\x42" * 4  # the readable part is not a free range
    driver.report([(RAM_GPA + 10, 4096), (RAM_GPA + 8192 + 10, 8192)])
    c = device.counters
    assert c["errors"] == 2 and c["pages_reported"] == 2
    assert not driver.broken
