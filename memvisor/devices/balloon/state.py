"""The virtio-balloon device's own state as data: target and actual size, the inflated and hinted page
bitmaps, the held statistics buffer and the last statistics, the hinting round, counters.

Quiesce (`quiesce_balloon`, with the device lock held by the caller): the stats timer is cancelled and every
queue is drained, as if its notification had arrived: buffers the driver published are completed before the
state is read, so none is half-done in the snapshot (the stats buffer stays held, as the device holds it).
`resume_balloon` arms the timer again.

Restore, after the transport (whose activation sizes the bitmaps for this machine's RAM): a bitmap whose
length does not fit guest RAM, a held stats buffer that is not in flight on the stats queue, or an unknown
hinting state is refused, naming the field, before anything is changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memvisor.devices.balloon.constants import STAT_COUNT, QueueRole, queue_roles
from memvisor.devices.balloon.device import COUNTER_NAMES, BalloonDevice
from memvisor.devices.balloon.hinting import HintState
from memvisor.devices.balloon.pages import BalloonRam
from memvisor.memory.guest_memory import GuestMemory
from memvisor.snapshot.codec import StateError, require

HINT_STATES = tuple(state.value for state in HintState)


# Bit planes for bytes.translate: _BIT[r] maps a packed byte to its bit r (0 or 1), _PLANE[r] a page's byte
# (any non-zero value is a set page) to the value of bit r in a packed byte (0 or 1 << r).
_BIT = tuple(bytes((value >> r) & 1 for value in range(256)) for r in range(8))
_PLANE = tuple(bytes(0 if value == 0 else 1 << r for value in range(256)) for r in range(8))


def _pack(bits: bytearray) -> bytes:
    """One byte per page (0 or 1) packed to one bit per page, little-endian bit order (page 8j+r is bit r of
    byte j). Never numpy (see _unpack): each bit plane is a strided slice and a translate, at C speed."""
    size = (len(bits) + 7) // 8
    if bits.count(0) == len(bits):  # nothing inflated or hinted: all zero bytes
        return bytes(size)
    padded = bytes(bits) + bytes(size * 8 - len(bits))
    packed = 0
    for r in range(8):
        packed |= int.from_bytes(padded[r::8].translate(_PLANE[r]), "little")
    return packed.to_bytes(size, "little")


def _unpack(data: bytes, size: int) -> bytearray:
    """The inverse of _pack: `size` bytes, one per page. Never numpy: a migration destination restores the
    balloon inside the guest's downtime, in a process that has not imported numpy, whose import costs seconds
    in the lab (a hinted bitmap made the destination's step 2.5 s). Eight translates and strided slice
    assignments at C speed, no Python work per page nor per byte."""
    if data.count(0) == len(data):
        return bytearray(size)
    expanded = bytearray(len(data) * 8)
    for r in range(8):
        expanded[r::8] = data.translate(_BIT[r])
    del expanded[size:]
    return expanded


@dataclass(frozen=True)
class BalloonState:
    num_pages: int
    actual: int
    poison_val: int
    stats_interval_ms: int
    stats_values: tuple[int, ...]  # -1: not reported
    stats_last_update_ms: int
    stats_updates: int
    stats_head: int  # -1: the device holds no stats buffer
    page_count: int  # bits in each bitmap: the PFN limit of the RAM the balloon covers (0 before activation)
    inflated: bytes  # packed bits, little-endian bit order
    hint_state: str
    hint_config_cmd_id: int
    hint_next_id: int
    hint_current_id: int  # -1: no round yet
    hinted: bytes
    hint_page_count: int  # bits in the hinted bitmap: hints cover boot RAM only, which may be less than page_count
    counters: tuple[tuple[str, int], ...]

    def validate(self) -> None:
        for name in ("num_pages", "actual", "poison_val", "hint_config_cmd_id", "hint_next_id"):
            require(0 <= getattr(self, name) < 1 << 32, name, "does not fit 32 bits")
        require(self.stats_interval_ms >= 0, "stats_interval_ms", "is negative")
        require(len(self.stats_values) == STAT_COUNT, "stats_values", f"holds {len(self.stats_values)}, expected {STAT_COUNT}")
        require(all(-1 <= v < 1 << 64 for v in self.stats_values), "stats_values", "holds a value outside 64 bits")
        require(-1 <= self.stats_head < 1 << 16, "stats_head", f"{self.stats_head} is not a queue head")
        require(self.page_count >= 0, "page_count", "is negative")
        require(self.hint_page_count >= 0, "hint_page_count", "is negative")
        for name, count in (("inflated", self.page_count), ("hinted", self.hint_page_count)):
            data = getattr(self, name)
            require(len(data) == (count + 7) // 8, name,
                    f"is {len(data)} bytes, {count} pages need {(count + 7) // 8}")  # fmt: skip
        require(self.hint_state in HINT_STATES, "hint_state", f"{self.hint_state!r} is not one of {HINT_STATES}")
        require(-1 <= self.hint_current_id < 1 << 32, "hint_current_id", "does not fit 32 bits")
        for name, value in self.counters:
            require(value >= 0, f"counters.{name}", "is negative")


def quiesce_balloon(device: BalloonDevice) -> None:
    """Stop the stats timer and complete every published buffer (call with the device lock held)."""
    device.stop_stats_timer()
    for index in device.queue_indexes():
        device.notify(index)


def resume_balloon(device: BalloonDevice) -> None:
    device.start_stats_timer()


def save_balloon(device: BalloonDevice) -> BalloonState:
    with device.lock:
        hinting = device.hinting
        return BalloonState(
            num_pages=device.num_pages,
            actual=device.actual,
            poison_val=device.poison_val,
            stats_interval_ms=round(device.stats_polling_interval * 1000),
            stats_values=tuple(-1 if v is None else v for v in device.stats.values),
            stats_last_update_ms=math.floor(device.stats.last_update * 1000),  # floor: rounding up could pass a second
            stats_updates=device.stats.updates,
            stats_head=-1 if device.held_stats_head is None else device.held_stats_head,
            page_count=device.inflated_bitmap.size,
            inflated=_pack(device.inflated_bitmap.bits),
            hint_state=hinting.state.value,
            hint_config_cmd_id=hinting.config_cmd_id,
            hint_next_id=hinting.next_id,
            hint_current_id=-1 if hinting.current_id is None else hinting.current_id,
            hinted=_pack(hinting.bitmap.bits),
            hint_page_count=hinting.bitmap.size,
            counters=tuple(sorted(device.counters.items())),
        )


def check_balloon(device: BalloonDevice, memory: GuestMemory, state: BalloonState, driver_ok: bool,
                  stats_in_flight: set[int], where: str) -> None:  # fmt: skip
    """Refuse a state that does not fit this machine: bitmaps sized for other RAM, a stats head not in flight."""
    expected = BalloonRam(memory, device.region_filter).pfn_limit if driver_ok else 0
    if state.page_count not in (0, expected):
        raise StateError(f"{where}.page_count: {state.page_count} pages, this machine's RAM has {expected}: give the "
                         "same --memory as when it was saved")  # fmt: skip
    expected_hints = BalloonRam(memory, device.hint_filter).pfn_limit if driver_ok else 0
    if state.hint_page_count not in (0, expected_hints):
        raise StateError(f"{where}.hint_page_count: {state.hint_page_count} pages, this machine's RAM has "
                         f"{expected_hints}: give the same --memory as when it was saved")  # fmt: skip
    if state.stats_head >= 0 and state.stats_head not in stats_in_flight:
        raise StateError(f"{where}.stats_head: buffer {state.stats_head} is not in flight on the stats queue")


def restore_balloon(device: BalloonDevice, state: BalloonState) -> None:
    """After the transport is restored (the device activated, if its driver was ready)."""
    with device.lock:
        device.num_pages = state.num_pages
        device.actual = state.actual
        device.poison_val = state.poison_val
        device.stats.values = [None if v < 0 else v for v in state.stats_values]
        device.stats.last_update = state.stats_last_update_ms / 1000
        device.stats.updates = state.stats_updates
        if state.page_count and device.inflated_bitmap.size == state.page_count:
            device.inflated_bitmap.bits[:] = _unpack(state.inflated, state.page_count)
        if state.hint_page_count and device.hinting.bitmap.size == state.hint_page_count:
            device.hinting.bitmap.bits[:] = _unpack(state.hinted, state.hint_page_count)
        hinting = device.hinting
        hinting.state = HintState(state.hint_state)
        hinting.config_cmd_id = state.hint_config_cmd_id
        hinting.load_ids(state.hint_next_id, None if state.hint_current_id < 0 else state.hint_current_id)
        device.counters = {name: 0 for name in COUNTER_NAMES} | {n: v for n, v in state.counters if n in COUNTER_NAMES}
        device.load_stats_holding(state.stats_interval_ms / 1000, None if state.stats_head < 0 else state.stats_head)


def stats_queue_index(device: BalloonDevice, driver_features: int) -> int | None:
    """The index of the stats queue under `driver_features` (the optional queues count only when negotiated)."""
    roles = queue_roles(driver_features & device.device_features())
    return roles.index(QueueRole.STATS) if QueueRole.STATS in roles else None
