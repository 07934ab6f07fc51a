"""KVM dirty log bitmaps as bool arrays by guest PFN (memvisor.vmm.dirty_log) and the balloon's hinting cycle
over the Machine's dirty log, without KVM."""

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
from memvisor.vmm.dirty_log import bitmap_bytes, unpack_dirty_bitmap

from .kvm_fakes import kvm_bitmap

MiB = 1 << 20


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
