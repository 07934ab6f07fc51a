"""The balloon statistics queue: the held buffer, polling, QEMU's guest-stats shape, the stats timer."""

from __future__ import annotations

import time

import pytest

from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.constants import STAT_NAMES, QueueRole
from memvisor.devices.balloon.stats import BalloonStats
from memvisor.devices.balloon.testing import TOTAL_RAM, BalloonDriver, balloon_memory, stats_buffer
from memvisor.errors import UsageError
from memvisor.virtio import mmio


@pytest.fixture
def memory():
    mem = balloon_memory()
    yield mem
    mem.close()


def stats_queue(driver: BalloonDriver):
    return driver.device._queues[QueueRole.STATS]


def test_first_buffer_sent_before_driver_ok_is_read_and_held(memory):
    before = time.time()
    device = BalloonDevice(TOTAL_RAM)
    driver = BalloonDriver(device, memory, stats=[(4, 111 << 20), (5, 512 << 20), (3, 42)])
    stats = device.guest_stats()
    assert stats["stats"]["stat-free-memory"] == 111 << 20
    assert stats["stats"]["stat-total-memory"] == 512 << 20
    assert stats["stats"]["stat-minor-faults"] == 42
    assert stats["stats"]["stat-swap-in"] == -1  # not sent
    assert set(stats["stats"]) == set(STAT_NAMES) and len(STAT_NAMES) == 16
    assert before - 1 <= stats["last-update"] <= time.time()
    # held: nothing on the used ring, one chain in flight
    assert driver.queues[QueueRole.STATS].used_idx() == 0
    assert sum(stats_queue(driver).in_flight.values()) == 1
    assert device.counters["stats_updates"] == 1


def test_request_returns_buffer_and_refill_updates_all_sixteen_tags_ignoring_unknown_ones(memory):
    device = BalloonDevice(TOTAL_RAM)
    driver = BalloonDriver(device, memory)
    irqs = driver.virtio.irq_count
    assert device.request_stats()
    assert driver.virtio.irq_count == irqs + 1
    assert not device.request_stats()  # nothing held any more
    entries = [(tag, 1000 + tag) for tag in range(16)] + [(16, 7), (0xFFFF, 9), (2, 2**64 - 1)]
    assert driver.refill_stats(entries)
    values = device.guest_stats()["stats"]
    assert [values[name] for name in STAT_NAMES[:2]] == [1000, 1001]
    assert values["stat-major-faults"] == 2**64 - 1  # a repeated tag keeps its last value
    assert values["stat-direct-reclaims"] == 1015
    assert device.counters["stats_unknown_tags"] == 2
    assert device.counters["errors"] == 0
    assert device.stats.get("stat-oom-kills") == 1010


def test_stats_not_sent_again_become_unset(memory):
    device = BalloonDevice(TOTAL_RAM)
    driver = BalloonDriver(device, memory, stats=[(4, 5), (6, 6)])
    device.request_stats()
    driver.refill_stats([(4, 9)])
    values = device.guest_stats()["stats"]
    assert values["stat-free-memory"] == 9 and values["stat-available-memory"] == -1


def test_poll_stats_follows_the_interval(memory):
    device = BalloonDevice(TOTAL_RAM, stats_polling_interval=10)
    driver = BalloonDriver(device, memory)
    now = time.monotonic()
    assert 9 <= device.stats_deadline(now) <= 10
    assert not device.poll_stats(now)
    assert device.poll_stats(now + 10.5)
    assert driver.refill_stats([(4, 1)])
    assert not device.poll_stats(now + 11)
    assert device.stats_deadline(now + 11) == pytest.approx(9.5)
    assert device.poll_stats(now + 21)
    assert device.counters["stats_requests"] == 2


def test_polling_interval_change_and_off(memory):
    device = BalloonDevice(TOTAL_RAM)
    driver = BalloonDriver(device, memory)
    assert device.stats_deadline() is None and not device.poll_stats()
    device.set_stats_polling_interval(5)
    assert device.stats_polling_interval == 5
    assert device.stats_deadline() == 0.0  # QEMU asks at once when polling is turned on
    assert device.poll_stats()
    driver.refill_stats([(4, 2)])
    device.set_stats_polling_interval(0)
    assert not device.poll_stats(time.monotonic() + 100)
    with pytest.raises(UsageError):
        device.set_stats_polling_interval(-1)


def test_device_owned_timer_polls_and_stops_on_close(memory):
    device = BalloonDevice(TOTAL_RAM, stats_polling_interval=0.05, stats_timer=True)
    driver = BalloonDriver(device, memory)
    deadline = time.monotonic() + 5
    while device.counters["stats_requests"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.counters["stats_requests"] >= 1
    assert driver.refill_stats([(4, 3)])
    device.close()
    assert device._timer is None
    count = device.counters["stats_requests"]
    time.sleep(0.2)
    assert device.counters["stats_requests"] == count


def test_reset_cancels_the_timer(memory):
    device = BalloonDevice(TOTAL_RAM, stats_polling_interval=30, stats_timer=True)
    driver = BalloonDriver(device, memory)
    assert device._timer is not None
    driver.virtio.write_reg(mmio.STATUS, 0)
    assert device._timer is None
    device.set_stats_polling_interval(20)  # not active: no timer
    assert device._timer is None


def test_stats_without_the_feature():
    device = BalloonDevice(TOTAL_RAM, stats=False, stats_polling_interval=1)
    assert len(device.queue_max_sizes) == 2
    assert not device.request_stats() and not device.poll_stats()
    assert device.guest_stats() == {"stats": dict.fromkeys(STAT_NAMES, -1), "last-update": 0}


def test_parser_counts_trailing_bytes_and_resets():
    stats = BalloonStats()
    result = stats.parse(stats_buffer([(1, 5), (99, 1)]) + b"\x01\x02\x03", now=1234.9)
    assert (result.known, result.unknown, result.trailing) == (1, 1, 3)
    assert stats.as_guest_stats()["last-update"] == 1234
    stats.reset()
    assert stats.as_guest_stats()["last-update"] == 0 and stats.get("stat-swap-out") is None
