"""virtio-balloon state: save, restore, save again gives equal state for states the driver reaches (inflate,
deflate, stats, hinting); bitmaps of the wrong length and a stats head not in flight are refused; quiesce
completes published buffers and stops the stats timer."""

import dataclasses
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.balloon.constants import QueueRole
from memvisor.devices.balloon.device import BalloonDevice
from memvisor.devices.balloon.state import (
    BalloonState,
    _pack,
    _unpack,
    check_balloon,
    quiesce_balloon,
    restore_balloon,
    save_balloon,
    stats_queue_index,
)
from memvisor.devices.balloon.testing import (
    RAM_GPA,
    RAM_PFN,
    TOTAL_RAM,
    BalloonDriver,
    balloon_memory,
    pfn_array,
)
from memvisor.snapshot.codec import StateError, decode, encode
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.state import restore_transport, save_transport

MiB = 1 << 20


def _json(value: object) -> object:
    return json.loads(json.dumps(encode(value)))


def _device() -> BalloonDevice:
    return BalloonDevice(TOTAL_RAM, stats=True, free_page_hint=True, free_page_reporting=True)


def _restore(driver: BalloonDriver) -> tuple[BalloonDevice, VirtioMmioTransport, BalloonState]:
    with driver.device.lock:
        quiesce_balloon(driver.device)
    state = decode(BalloonState, _json(save_balloon(driver.device)))
    transport_state = save_transport(driver.virtio.transport)
    fresh = _device()
    transport = VirtioMmioTransport(fresh, driver.memory, lambda: None)
    index = stats_queue_index(fresh, transport_state.driver_features)
    in_flight = {h for h, _ in transport_state.queues[index].in_flight} if index is not None else set()
    check_balloon(fresh, driver.memory, state, True, in_flight, "balloon")
    restore_transport(transport, transport_state, "transport")
    restore_balloon(fresh, state)
    assert save_transport(transport) == transport_state
    return fresh, transport, state


@settings(max_examples=20, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["inflate", "deflate", "stats", "hint"]), st.integers(0, 2000),
                           st.integers(1, 64)), max_size=8),  # fmt: skip
    num_pages=st.integers(0, 5000),
)
def test_balloon_save_restore_save(ops: list[tuple[str, int, int]], num_pages: int) -> None:
    memory = balloon_memory()
    device = _device()
    driver = BalloonDriver(device, memory)
    device.set_num_pages(num_pages)
    for kind, first, count in ops:
        pfns = range(RAM_PFN + first, RAM_PFN + first + count)
        if kind == "inflate":
            driver.inflate(pfns)
            driver.set_actual(device.actual + count)
        elif kind == "deflate":
            driver.deflate(pfns)
        elif kind == "stats":
            device.request_stats()
            driver.refill_stats([(4, first), (5, count)])
        elif kind == "hint" and device.hint_state.value in ("idle", "done", "stopped"):
            device.start_hinting()
    fresh, _, state = _restore(driver)
    assert save_balloon(fresh) == state
    assert fresh.inflated_ranges() == device.inflated_ranges()
    assert fresh.guest_stats() == device.guest_stats()
    fresh.close()
    device.close()
    memory.close()


def test_stats_last_update_survives_restore_just_before_a_second_boundary() -> None:
    """CI once saw last-update 1796072921.9996 come back as ...922: the saved milliseconds were rounded up."""
    memory = balloon_memory()
    driver = BalloonDriver(_device(), memory)
    driver.device.request_stats()
    driver.refill_stats([(4, 1)])
    driver.device.stats.last_update = 1796072921.9996
    fresh, _, _ = _restore(driver)
    assert fresh.guest_stats()["last-update"] == 1796072921
    fresh.close()
    driver.device.close()
    memory.close()


def test_restored_balloon_returns_the_held_stats_buffer_to_the_same_driver() -> None:
    memory = balloon_memory()
    driver = BalloonDriver(_device(), memory)
    fresh, transport, state = _restore(driver)
    assert state.stats_head >= 0
    driver.virtio.transport = transport
    assert fresh.request_stats()  # the buffer held at save time goes back to the guest's driver
    assert driver.queues[QueueRole.STATS].get_used()
    memory.close()


def test_quiesce_completes_a_published_buffer_not_yet_notified() -> None:
    memory = balloon_memory()
    device = _device()
    driver = BalloonDriver(device, memory)
    driver.queues[QueueRole.INFLATE].add_buffer([pfn_array(range(RAM_PFN, RAM_PFN + 8))], [])  # no kick
    with device.lock:
        quiesce_balloon(device)
    assert device.inflated_pages() == 8
    assert driver.queues[QueueRole.INFLATE].get_used()
    memory.close()


def test_untrusted_balloon_states_are_refused() -> None:
    memory = balloon_memory()
    driver = BalloonDriver(_device(), memory)
    state = save_balloon(driver.device)
    raw = _json(state)
    assert isinstance(raw, dict)
    raw["inflated"] = "AAAA"
    with pytest.raises(StateError, match=r"^state\.inflated: is 3 bytes"):
        decode(BalloonState, raw)
    raw = _json(state)
    assert isinstance(raw, dict)
    raw["hint_state"] = "flying"
    with pytest.raises(StateError, match=r"^state\.hint_state"):
        decode(BalloonState, raw)
    fresh = _device()
    smaller = dataclasses.replace(state, page_count=8, inflated=bytes(1), hinted=bytes(1))
    with pytest.raises(StateError, match=r"^balloon\.page_count: 8 pages"):
        check_balloon(fresh, memory, smaller, True, set(), "balloon")
    with pytest.raises(StateError, match=r"^balloon\.stats_head: buffer .* is not in flight"):
        check_balloon(fresh, memory, state, True, set(), "balloon")
    memory.close()


def test_hints_over_less_ram_than_the_balloon_round_trip() -> None:
    """The balloon covers boot RAM and plugged virtio-mem, hints only boot RAM: the two bitmaps differ in
    length, and each is saved, checked and restored with its own (a restore was refused before)."""
    def device() -> BalloonDevice:
        return BalloonDevice(TOTAL_RAM, stats=True, free_page_hint=True, free_page_reporting=True,
                             hint_filter=lambda region: region.name == "rings")  # fmt: skip

    memory = balloon_memory()
    driver = BalloonDriver(device(), memory)
    driver.inflate([RAM_PFN + 5, RAM_PFN + 9])
    with driver.device.lock:
        quiesce_balloon(driver.device)
    state = decode(BalloonState, _json(save_balloon(driver.device)))
    assert state.hint_page_count < state.page_count
    fresh = device()
    transport_state = save_transport(driver.virtio.transport)
    transport = VirtioMmioTransport(fresh, memory, lambda: None)
    index = stats_queue_index(fresh, transport_state.driver_features)
    in_flight = {h for h, _ in transport_state.queues[index].in_flight} if index is not None else set()
    check_balloon(fresh, memory, state, True, in_flight, "balloon")
    restore_transport(transport, transport_state, "transport")
    restore_balloon(fresh, state)
    assert save_balloon(fresh) == state


@settings(max_examples=40, deadline=None)
@given(bits=st.lists(st.integers(0, 1), max_size=300))
def test_bitmaps_pack_as_numpy_packbits_little_endian(bits: list[int]) -> None:
    import numpy as np

    page_bytes = bytearray(bits)
    packed = np.packbits(np.array(bits, dtype=bool), bitorder="little").tobytes()
    assert _pack(page_bytes) == packed
    assert _unpack(packed, len(bits)) == page_bytes


def test_a_hinted_balloon_is_saved_checked_and_restored_without_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A migration destination restores the balloon inside the downtime, in a process that never imported
    numpy (seconds in the lab): a hinted bitmap of 4 MiB blocks scattered over RAM must not need it."""
    memory = balloon_memory()
    driver = BalloonDriver(_device(), memory)
    device = driver.device
    driver.send_cmd_id(device.start_hinting(), 0x7FF000)
    blocks = [(RAM_GPA + n * 4 * MiB, 4 * MiB) for n in (0, 3, 5, 11, 19)]
    driver.hint(blocks)
    driver.inflate([RAM_PFN + 5, RAM_PFN + 9])
    assert device.hinting.hinted_ranges() == blocks
    monkeypatch.setitem(sys.modules, "numpy", None)  # any `import numpy` from here on raises ImportError
    fresh, _, state = _restore(driver)
    assert fresh.hinting.hinted_ranges() == blocks
    assert fresh.inflated_ranges() == device.inflated_ranges()
    assert save_balloon(fresh) == state
    fresh.close()
    device.close()
