"""KVM dirty log bitmaps as bool arrays by guest PFN (memvisor.vmm.dirty_log), without KVM."""

import ctypes

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.control.adapters import BalloonAdapter
from memvisor.control.machine_api import HintState, MachineError
from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.constants import CMD_ID_DONE
from memvisor.devices.balloon.testing import (
    RAM_GPA,
    RAM_SIZE,
    RINGS_SIZE,
    TOTAL_RAM,
    BalloonDriver,
    balloon_memory,
)
from memvisor.errors import UsageError
from memvisor.kvm import structs
from memvisor.kvm.system import MemorySlot
from memvisor.vmm.dirty_log import DirtyLog, bitmap_bytes, unpack_dirty_bitmap

MiB = 1 << 20


def kvm_bitmap(dirty: set[int], pages: int) -> bytes:
    """What KVM writes: unsigned longs (64-bit, little-endian), bit i of word j for page 64*j + i."""
    words = [0] * (-(-pages // 64))
    for page in dirty:
        words[page // 64] |= 1 << (page % 64)
    return b"".join(word.to_bytes(8, "little") for word in words)


@given(st.integers(1, 4096).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_unpack_matches_kvm_word_layout(case: tuple[int, set[int]]) -> None:
    pages, dirty = case
    array = unpack_dirty_bitmap(kvm_bitmap(dirty, pages), pages)
    assert array.dtype == bool and array.size == pages
    assert set(np.flatnonzero(array).tolist()) == dirty


def test_bits_past_the_slot_are_ignored_and_short_bitmaps_refused() -> None:
    bitmap = (1 << 63 | 1 << 2).to_bytes(8, "little")  # page 63 lies past a 10-page slot
    assert np.flatnonzero(unpack_dirty_bitmap(bitmap, 10)).tolist() == [2]
    with pytest.raises(ValueError, match="cannot cover"):
        unpack_dirty_bitmap(bytes(8), 65)


@pytest.mark.parametrize(("pages", "expected"), [(1, 8), (64, 8), (65, 16), (262144, 32768)])
def test_bitmap_bytes_are_whole_words(pages: int, expected: int) -> None:
    assert bitmap_bytes(pages) == expected


class FakeVm:
    """Memslots and per-slot dirty pages, as KVM keeps them; get_dirty_log hands them out once."""

    def __init__(self, slots: list[tuple[int, int]]) -> None:
        self.slots = {i: MemorySlot(i, gpa, size, 0x7F0000000000 + gpa, 0) for i, (gpa, size) in enumerate(slots)}
        self.written: dict[int, set[int]] = {i: set() for i in self.slots}
        self.calls: list[tuple[int, int]] = []

    def set_memory_slot(self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0) -> None:
        self.calls.append((slot, flags))
        self.slots[slot] = MemorySlot(slot, gpa, size, userspace_addr, flags)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        info = self.slots[slot]
        assert info.flags & structs.KVM_MEM_LOG_DIRTY_PAGES, "KVM refuses a slot without dirty logging"
        pages = info.size >> 12
        data = kvm_bitmap(self.written[slot], pages)
        assert len(bitmap) >= len(data)
        ctypes.memmove(bitmap, data, len(data))
        self.written[slot] = set()

    def write(self, gpa: int) -> None:
        for info in self.slots.values():
            if info.guest_phys_addr <= gpa < info.guest_phys_addr + info.size:
                self.written[info.slot].add((gpa - info.guest_phys_addr) >> 12)


class ManualFakeVm(FakeVm):
    """FakeVm that also offers KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: once enabled, get_dirty_log leaves the bits
    set (a page with its bit set takes further writes unseen: a set cannot record them twice) until
    clear_dirty_log clears the ones its bitmap names, checking KVM's alignment rules."""

    def __init__(self, slots: list[tuple[int, int]], *, supported: bool = True) -> None:
        super().__init__(slots)
        self.supported = supported
        self.manual = False
        self.clears: list[tuple[int, int, int]] = []

    def check_extension(self, capability: int) -> int:
        from memvisor.kvm import ioctls

        return int(self.supported and capability == ioctls.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)

    def enable_cap(self, capability: int, *args: int) -> None:
        if not self.supported:
            raise OSError(22, "KVM_ENABLE_CAP: Invalid argument")
        self.manual = bool(args[0] & structs.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        if not self.manual:
            super().get_dirty_log(slot, bitmap)
            return
        data = kvm_bitmap(self.written[slot], self.slots[slot].size >> 12)
        ctypes.memmove(bitmap, data, len(data))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: ctypes.Array) -> None:  # type: ignore[type-arg]
        pages = self.slots[slot].size >> 12
        assert self.manual, "KVM refuses KVM_CLEAR_DIRTY_LOG without manual protection"
        assert first_page % 64 == 0 and (num_pages % 64 == 0 or first_page + num_pages == pages), "EINVAL"
        assert first_page + num_pages <= pages and len(bytes(bitmap)) >= bitmap_bytes(num_pages)
        bits = unpack_dirty_bitmap(bytes(bitmap), num_pages)
        self.written[slot] -= {first_page + i for i in np.flatnonzero(bits).tolist()}
        self.clears.append((slot, first_page, num_pages))


def test_fetch_merges_slots_by_guest_pfn_and_clears() -> None:
    vm = FakeVm([(0, 3 * MiB), (4 << 30, 1 * MiB)])  # RAM below and above a hole
    log = DirtyLog(vm, [0, 1])
    assert not log.fetch().any()  # before start nothing is logged (and KVM is not asked)
    log.start()
    assert [flags for _, flags in vm.calls] == [structs.KVM_MEM_LOG_DIRTY_PAGES] * 2
    writes = [0x1000, 0x2FFFFF, (4 << 30) + 0x5000]
    for gpa in writes:
        vm.write(gpa)
    dirty = log.fetch()
    assert dirty.size == log.pfn_limit == ((4 << 30) + MiB) >> 12
    assert np.flatnonzero(dirty).tolist() == [gpa >> 12 for gpa in writes]
    assert not log.fetch().any()  # each write is reported once
    log.stop()
    assert vm.slots[0].flags == 0 and vm.slots[1].flags == 0
    assert not log.fetch().any()


def test_start_and_stop_are_idempotent_and_keep_other_flags() -> None:
    vm = FakeVm([(0, MiB)])
    vm.slots[0] = MemorySlot(0, 0, MiB, 0x1000, structs.KVM_MEM_READONLY)
    log = DirtyLog(vm, [0])
    log.start()
    log.start()
    assert vm.calls == [(0, structs.KVM_MEM_READONLY | structs.KVM_MEM_LOG_DIRTY_PAGES)]
    log.stop()
    log.stop()
    assert vm.calls[1:] == [(0, structs.KVM_MEM_READONLY)]


# --- the balloon's hinting cycle over a dirty log (control.adapters.BalloonAdapter) --------------------------


class FakeMachineLog:
    """The Machine's dirty log API over a set of written PFNs; records when logging started."""

    def __init__(self, pfn_limit: int, device: BalloonDevice | None = None) -> None:
        self.pfn_limit = pfn_limit
        self.written: set[int] = set()
        self.dirty_logging = False
        self.device = device
        self.cmd_id_when_started: int | None = None
        self.broken = False

    def start_dirty_log(self) -> None:
        self.dirty_logging = True
        if self.device is not None:
            self.cmd_id_when_started = self.device.hinting.config_cmd_id

    def stop_dirty_log(self) -> None:
        self.dirty_logging = False

    def dirty_pages(self) -> np.ndarray:
        if self.broken:
            raise OSError("KVM_GET_DIRTY_LOG failed")
        dirty = np.zeros(self.pfn_limit, dtype=bool)
        dirty[sorted(self.written)] = True
        self.written.clear()
        return dirty

    def write(self, gpa: int, length: int) -> None:
        self.written.update(range(gpa >> 12, (gpa + length + 4095) >> 12))


BLOCK = 4 * MiB
CMD_AT = 0x700000


@pytest.fixture
def hinting_rig():  # type: ignore[no-untyped-def]
    memory = balloon_memory()
    device = BalloonDevice(TOTAL_RAM, free_page_hint=True)
    driver = BalloonDriver(device, memory)
    log = FakeMachineLog((RAM_GPA + RAM_SIZE) >> 12, device)
    yield BalloonAdapter(device, "balloon0", dirty_log=log), driver, log
    memory.close()


def test_writes_before_a_hint_keep_it_writes_after_drop_it(hinting_rig) -> None:  # type: ignore[no-untyped-def]
    adapter, driver, log = hinting_rig
    started = adapter.hint_start()
    assert log.dirty_logging and log.cmd_id_when_started == CMD_ID_DONE  # on before the id was written
    driver.send_cmd_id(started.cmd_id, CMD_AT)
    blocks = [RAM_GPA + i * BLOCK for i in range(4)]
    for gpa in blocks:
        log.write(gpa, BLOCK)  # the driver's alloc_pages zeroes the block (init_on_alloc) before hinting it
        driver.hint([(gpa, BLOCK)])
    [status] = adapter.hint_status()
    assert (status.state, status.bytes) == (HintState.RUNNING, 4 * BLOCK)
    done = adapter.hint_stop()
    assert (done.state, done.bytes) == (HintState.DONE, 4 * BLOCK)
    assert driver.config()[2] == CMD_ID_DONE  # the guest may reuse the blocks
    log.write(blocks[1] + 4096, 3 * 4096)  # the guest reuses part of one block...
    log.write(0, RINGS_SIZE)  # ...and writes memory that was never hinted
    [after] = adapter.hint_status()
    assert after.bytes == 4 * BLOCK - 3 * 4096
    reused = (blocks[1] + 4096, 3 * 4096)
    assert adapter.device.hinted_ranges() == [(blocks[0], reused[0] - blocks[0]), (sum(reused), blocks[3] + BLOCK - sum(reused))]


def test_a_lost_dirty_log_drops_every_hint(hinting_rig) -> None:  # type: ignore[no-untyped-def]
    adapter, driver, log = hinting_rig
    driver.send_cmd_id(adapter.hint_start().cmd_id, CMD_AT)
    driver.hint([(RAM_GPA, BLOCK)])
    assert adapter.hint_status()[-1].pages == BLOCK // 4096
    log.broken = True
    with pytest.raises(MachineError, match="dirty log"):
        adapter.hint_status()
    driver.hint([(RAM_GPA + BLOCK, BLOCK)])  # the device cannot read the log either: only this hint is left
    log.broken = False
    assert adapter.device.hinted_ranges() == [(RAM_GPA + BLOCK, BLOCK)]


def test_no_dirty_log_left_on_when_hinting_is_off() -> None:
    device = BalloonDevice(TOTAL_RAM)  # free-page-hint=off
    log = FakeMachineLog(TOTAL_RAM >> 12)
    with pytest.raises(UsageError, match="free page hinting"):  # mapped to QMP once, by the server
        BalloonAdapter(device, "balloon0", dirty_log=log).hint_start()
    assert not log.dirty_logging
