"""virtio-balloon through the virtio-mmio transport and a Linux-like driver: features, queues, config,
inflate and deflate."""

from __future__ import annotations

import struct

import pytest

from memvisor.devices.balloon import BalloonDevice, BalloonError
from memvisor.devices.balloon.constants import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    QueueRole,
)
from memvisor.devices.balloon.testing import RAM_GPA, RAM_PFN, TOTAL_RAM, BalloonDriver, MiB, balloon_memory
from memvisor.errors import UsageError
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio import mmio
from memvisor.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
    VIRTIO_MMIO_INT_CONFIG,
    VirtioDeviceError,
)

TOTAL = TOTAL_RAM
make_memory = balloon_memory


def ram_allocated(memory: GuestMemory) -> int:
    return memory.allocated_bytes(memory.regions[1])


@pytest.fixture
def memory():
    mem = make_memory()
    yield mem
    mem.close()


def setup(memory: GuestMemory, **options) -> tuple[BalloonDevice, BalloonDriver]:
    features = options.pop("features", None)
    poison_val = options.pop("poison_val", None)
    device = BalloonDevice(TOTAL, **options)
    return device, BalloonDriver(device, memory, features=features, poison_val=poison_val)


def test_identity_and_offered_features_follow_the_options(memory):
    device, driver = setup(memory, deflate_on_oom=True, must_tell_host=True, page_poison=False)
    assert driver.virtio.read_reg(mmio.DEVICE_ID) == VIRTIO_ID_BALLOON == device.device_id
    offered = driver.virtio.device_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_STATS_VQ,
                VIRTIO_BALLOON_F_DEFLATE_ON_OOM):
        assert offered >> bit & 1
    for bit in (VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING):
        assert not offered >> bit & 1
    assert device.queue_max_sizes == (128, 128, 128)
    assert issubclass(BalloonError, VirtioDeviceError)


def test_every_feature_offered_gives_five_queues_with_reporting_big_enough(memory):
    device, driver = setup(memory, free_page_hint=True, free_page_reporting=True)
    assert len(device.queue_max_sizes) == 5
    assert min(device.queue_max_sizes) >= 32
    assert list(driver.queues) == [QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.STATS, QueueRole.FREE_PAGE,
                                   QueueRole.REPORTING]


def test_queue_indexes_after_deflate_count_only_negotiated_features(memory):
    # Stats and hinting offered but not negotiated: reporting is queue 2, as in Linux's find_vqs.
    device, driver = setup(memory, free_page_hint=True, free_page_reporting=True,
                           features=(1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING))
    assert list(driver.queues) == [QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.REPORTING]
    assert driver.queues[QueueRole.REPORTING].index == 2
    memory.write(RAM_GPA, b"\x55" * (2 * MiB))
    assert driver.report([(RAM_GPA, 2 * MiB)])
    assert device.counters["pages_reported"] == 512
    assert memory.read(RAM_GPA, 16) == bytes(16)
    assert not driver.broken


def test_inflate_256_pfns_discards_their_backing_in_one_punch(memory, monkeypatch):
    device, driver = setup(memory)
    memory.write(RAM_GPA, b"\xaa" * (2 * MiB))  # touch the pages so the host really holds them
    before = ram_allocated(memory)
    assert before >= 2 * MiB
    calls = []
    real_discard = memory.discard
    monkeypatch.setattr(memory, "discard",
                        lambda gpa, length, who: (calls.append((gpa, length)), real_discard(gpa, length, who)))
    pfns = list(range(RAM_PFN, RAM_PFN + 256))
    used = driver.inflate(pfns)
    assert [(written, data) for _, written, data in used] == [(0, b"")]
    assert calls == [(RAM_GPA, MiB)]  # 256 contiguous PFNs coalesce into one discard
    assert before - ram_allocated(memory) == MiB
    assert memory.read(RAM_GPA, MiB) == bytes(MiB)
    assert memory.read(RAM_GPA + MiB, 4) == b"\xaa" * 4  # the next page is untouched
    assert device.inflated_pages() == 256
    assert device.inflated_ranges() == [(RAM_GPA, MiB)]
    c = device.counters
    assert (c["inflate_requests"], c["pages_inflated"], c["bytes_discarded"], c["errors"]) == (1, 256, MiB, 0)
    assert driver.virtio.irq_count >= 1


def test_scattered_pfns_coalesce_into_runs(memory, monkeypatch):
    device, driver = setup(memory)
    calls = []
    real_discard = memory.discard
    monkeypatch.setattr(memory, "discard",
                        lambda gpa, length, who: (calls.append((gpa, length)), real_discard(gpa, length, who)))
    pfns = [RAM_PFN + 10, RAM_PFN + 3, RAM_PFN + 4, RAM_PFN + 5, RAM_PFN + 10, RAM_PFN + 100]
    driver.inflate(pfns)
    assert calls == [(RAM_GPA + 3 * 4096, 3 * 4096), (RAM_GPA + 10 * 4096, 4096), (RAM_GPA + 100 * 4096, 4096)]
    assert device.counters["pages_inflated"] == 5  # the duplicate counts once


def test_deflate_returns_pages_and_memory_comes_back_on_touch(memory):
    device, driver = setup(memory)
    pfns = range(RAM_PFN, RAM_PFN + 256)
    driver.inflate(pfns)
    driver.set_actual(256)
    used = driver.deflate(pfns)
    assert [written for _, written, _ in used] == [0]
    driver.set_actual(0)
    assert device.inflated_pages() == 0
    assert device.counters["pages_deflated"] == 256 and device.counters["deflate_requests"] == 1
    memory.write(RAM_GPA, b"back")
    assert memory.read(RAM_GPA, 4) == b"back"
    assert ram_allocated(memory) >= 4096


def test_deflate_without_must_tell_host_is_fine(memory):
    device, driver = setup(memory, must_tell_host=True, features=(1 << VIRTIO_F_VERSION_1))
    assert not driver.features >> VIRTIO_BALLOON_F_MUST_TELL_HOST & 1
    driver.inflate([RAM_PFN])
    driver.deflate([RAM_PFN])
    assert device.inflated_pages() == 0 and not driver.broken


def test_target_change_raises_config_interrupt_and_updates_num_pages(memory):
    device, driver = setup(memory)
    irqs = driver.virtio.irq_count
    generation = driver.virtio.read_reg(mmio.CONFIG_GENERATION)
    device.set_target(TOTAL - 4 * MiB)
    assert driver.virtio.irq_count == irqs + 1
    assert driver.virtio.ack_interrupt() & VIRTIO_MMIO_INT_CONFIG
    assert driver.virtio.read_reg(mmio.CONFIG_GENERATION) != generation
    assert driver.config()[0] == 1024
    assert device.target_bytes() == TOTAL - 4 * MiB
    device.set_target(10 * TOTAL)  # above RAM: an empty balloon
    assert driver.config()[0] == 0
    device.set_num_pages(7)
    assert driver.config()[0] == 7
    with pytest.raises(UsageError):
        device.set_target(0)
    with pytest.raises(UsageError):
        device.set_num_pages(TOTAL)  # more pages than RAM


def test_actual_written_by_driver_fires_change_listener(memory):
    events = []
    device, driver = setup(memory, on_change=events.append)
    later = []
    device.add_change_listener(later.append)
    driver.set_actual(256)
    assert device.actual_bytes() == MiB
    assert device.guest_memory_bytes() == TOTAL - MiB
    assert events == later == [TOTAL - MiB]
    driver.set_actual(256)  # no change, no event
    assert events == [TOTAL - MiB]
    assert driver.config()[1] == 256


def test_failing_listener_does_not_break_the_device(memory):
    def bad(_: int) -> None:
        raise RuntimeError("control plane bug")

    device, driver = setup(memory, on_change=bad)
    driver.set_actual(1)
    assert device.actual == 1 and not driver.broken


def test_config_accesses_of_any_width_and_read_only_fields(memory):
    device, driver = setup(memory)
    device.set_num_pages(0x1234)
    raw = driver.virtio.read_config(0, 16)
    assert raw[:4] == struct.pack("<I", device.num_pages)
    # byte-wide writes to actual merge; a write to num_pages is ignored
    driver.virtio.write_config(4, b"\x01")
    driver.virtio.write_config(5, b"\x02")
    driver.virtio.write_config(0, b"\xff\xff\xff\xff")
    assert device.actual == 0x0201
    assert device.num_pages == 0x1234
    assert device.read_config(14, 8) == bytes(8)  # zeros past the end
    assert device.read_config(-1, 4) == bytes(4)
    device.write_config(40, b"\x01")  # past the end: ignored
    device.write_config(-2, b"\x01")
    assert device.actual == 0x0201


def test_reset_forgets_the_balloon_and_the_driver_can_start_again(memory):
    events = []
    device, driver = setup(memory, on_change=events.append)
    device.set_num_pages(256)
    driver.inflate(range(RAM_PFN, RAM_PFN + 256))
    driver.set_actual(256)
    driver.virtio.write_reg(mmio.STATUS, 0)
    assert device.actual == 0 and device.inflated_pages() == 0
    assert events[-1] == TOTAL
    assert device.num_pages == 256  # the host's wish outlives the driver
    driver2 = BalloonDriver(device, memory)
    assert driver2.config()[0] == 256
    driver2.inflate([RAM_PFN])
    assert device.inflated_pages() == 1 and not driver2.broken


def test_bad_constructor_options_are_usage_errors():
    with pytest.raises(UsageError):
        BalloonDevice(0)
    with pytest.raises(UsageError):
        BalloonDevice(4097)
    with pytest.raises(UsageError):
        BalloonDevice(MiB, stats_polling_interval=-1)


def test_read_only_and_excluded_regions_are_never_discarded(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(b"\x77" * MiB)
    memory = make_memory()
    memory.add(MemoryRegion.file(128 * MiB, path, MiB, readonly=True, name="pmem"))
    try:
        device = BalloonDevice(TOTAL, region_filter=lambda region: region.name == "ram")
        driver = BalloonDriver(device, memory)
        memory.write(0x100000, b"\x33" * 4096)  # a page of the rings region, excluded by the filter
        driver.inflate([0x100, (128 * MiB) >> 12, RAM_PFN])
        assert memory.read(0x100000, 4) == b"\x33" * 4
        assert path.read_bytes()[:4] == b"\x77" * 4
        assert device.counters["errors"] == 2 and device.counters["pages_inflated"] == 1
        assert not driver.broken
    finally:
        memory.close()
