"""The source of a live migration (memvisor/migration/source.py, pages.py) against fake machines with real memfd
memory: reading guest RAM never through a PROT_NONE mapping, the dirty set of a pass and its convergence with
free page hints, and A -> B -> A under a guest that keeps writing."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from memvisor.migration import source
from memvisor.migration.source import MigrationParameters, PreCopy, SourceHooks
from memvisor.migration.stream import PAGE_SIZE

from .migration_fakes import PAGES, VMEM_BLOCK, VMEM_SIZE, FakeMachine, fake_machine_state, migrate


@pytest.fixture
def no_kvm_state(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_machine_state(monkeypatch)


def in_child(test: Callable[[], None]) -> None:
    """Run `test` in a forked process: a SIGSEGV there fails this test instead of killing the test run."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 0
        try:
            os.close(read_end)
            test()
        except BaseException:  # noqa: BLE001 - everything goes to the parent
            os.write(write_end, traceback.format_exc().encode()[-8000:])
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            pytest.fail("the migration in the child process did not end within 120 s")
        time.sleep(0.02)
    with os.fdopen(read_end, "rb") as pipe:  # the report (at most 8000 bytes) fits the pipe's buffer
        report = pipe.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        pytest.fail(f"the migration killed its process with signal {os.WTERMSIG(status)}")
    assert os.WEXITSTATUS(status) == 0, report


def plug(machine: FakeMachine, blocks: int) -> None:
    """Plug the first `blocks` blocks of the machine's virtio-mem device (the rest stay PROT_NONE)."""
    device = machine.devices[0].device
    plugged = np.zeros(VMEM_SIZE // VMEM_BLOCK, dtype=bool)
    plugged[:blocks] = True
    device.load_plugged_state(plugged, blocks * VMEM_BLOCK, VMEM_SIZE)
    device.apply_plugged_access()


def test_a_reset_that_unplugs_virtio_mem_mid_pass_never_makes_the_source_read_a_protected_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine reset unplugs every virtio-mem block (PROT_NONE, punched out) whatever `busy` says. It lands after
    the pass looked at the plugged blocks and at what the memfd backs, before it reads them: the source reads the
    memfd, where an unplugged block is a hole of zeros, never the mapping (a SIGSEGV of the whole VMM); the next
    PLUGGED record tells the destination, and both end with nothing plugged and the same RAM."""

    def scenario() -> None:
        fake_machine_state(monkeypatch)
        monkeypatch.setattr(source, "CHUNK_PAGES", 1 << 20)  # one chunk per region: ram0's, then vmem0's
        src, dst = FakeMachine(vmem=True), FakeMachine(vmem=True)
        plug(src, 2)
        vmem_pfn = src.devices[0].device.addr // PAGE_SIZE
        for page in range(0, 2 * VMEM_BLOCK // PAGE_SIZE, 37):
            src.guest_write(vmem_pfn + page, bytes([page % 251 + 1]) * PAGE_SIZE)
        for pfn in range(0, PAGES, 3):
            src.guest_write(pfn, bytes([pfn % 249 + 1]) * PAGE_SIZE)
        chunks: list[int] = []

        def hinted() -> np.ndarray:  # called for each chunk, after the pass looked at plugged and backed pages
            chunks.append(1)
            if len(chunks) == 2:  # pass 1, vmem0's chunk: the machine resets
                src.devices[0].device.system_reset()
            return np.zeros(0, dtype=bool)

        migrate(src, dst, SourceHooks(hinted=hinted))
        assert len(chunks) >= 2
        assert src.devices[0].device.plugged_ranges() == dst.devices[0].device.plugged_ranges() == []
        for pfn in range(PAGES):
            assert dst.page(pfn) == src.page(pfn), pfn
        region = dst.memory.regions[1]
        assert os.pread(region.fd, 2 * VMEM_BLOCK, 0) == bytes(2 * VMEM_BLOCK)  # the destination's blocks: zeros

    in_child(scenario)


def test_the_reader_reads_pages_the_mapping_keeps_prot_none_and_outlives_its_region() -> None:
    from memvisor.errors import MemvisorError
    from memvisor.memory.guest_memory import MemoryRegion
    from memvisor.migration.pages import RegionReader

    region = MemoryRegion.memfd(0, 64 * PAGE_SIZE, "ram")
    region.view[3 * PAGE_SIZE : 5 * PAGE_SIZE] = b"p" * (2 * PAGE_SIZE)
    region.view[9 * PAGE_SIZE] = 7
    region.protect(0, 16 * PAGE_SIZE, accessible=False)  # a load through the view would be a SIGSEGV now
    reader = RegionReader(region)
    try:
        assert reader.data_mask().nonzero()[0].tolist() == [3, 4, 9]
        buffer = memoryview(bytearray(8 * PAGE_SIZE))
        reader.read(2 * PAGE_SIZE, buffer)
        assert bytes(buffer[:PAGE_SIZE]) == bytes(PAGE_SIZE)  # a hole: zeros, and still a hole afterwards
        assert bytes(buffer[PAGE_SIZE : 3 * PAGE_SIZE]) == b"p" * (2 * PAGE_SIZE)
        assert buffer[7 * PAGE_SIZE] == 7
        assert reader.data_mask().nonzero()[0].tolist() == [3, 4, 9]
        with pytest.raises(ValueError, match="not whole pages inside the region"):
            reader.read(60 * PAGE_SIZE, buffer)
        region.close()  # the machine ends under a running migration: the reader still reads the memfd
        reader.read(3 * PAGE_SIZE, buffer[:PAGE_SIZE])
        assert bytes(buffer[:PAGE_SIZE]) == b"p" * PAGE_SIZE
    finally:
        reader.close()
        region.close()
    anonymous = MemoryRegion.anonymous(0, 4 * PAGE_SIZE, "anon")
    try:
        with pytest.raises(MemvisorError, match="'anon' has no file behind it: .*memfd-backed"):
            RegionReader(anonymous)
    finally:
        anonymous.close()


class PassRecorder:
    """Records the pages each pass wanted (PreCopy._send_pass) and the pass under way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wanted: list[set[int]] = []
        send_pass = PreCopy._send_pass

        def recorded(precopy: PreCopy, wanted: np.ndarray, *, first_pass: bool, final: bool = False) -> None:
            self.wanted.append(set(np.flatnonzero(wanted).tolist()) if not first_pass else set())
            send_pass(precopy, wanted, first_pass=first_pass, final=final)

        monkeypatch.setattr(PreCopy, "_send_pass", recorded)

    @property
    def number(self) -> int:
        return len(self.wanted)


def test_pages_written_then_hinted_free_during_a_pass_do_not_count_against_convergence(
    no_kvm_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest writes 64 pages during pass 1, then frees them and hints them. They are dirty, but no pass will
    send them (hinted and not written since): the dirty set that decides whether another pass is needed leaves
    them out, so pass 1 converges and the final pass follows (before: a second pass ran just to skip them)."""
    src, dst = FakeMachine(), FakeMachine()
    for pfn in range(16):
        src.guest_write(pfn, b"d" * PAGE_SIZE)
    freed = range(100, 164)
    hinted = np.zeros(PAGES, dtype=bool)

    def guest(number: int) -> None:
        if number == 1:
            for pfn in freed:
                src.guest_write(pfn, b"f" * PAGE_SIZE)
            hinted[freed.start : freed.stop] = True

    params = MigrationParameters(max_bandwidth=1 << 20, downtime_limit_ms=0, max_passes=5)  # 64 pages: 250 ms
    stats = migrate(src, dst, SourceHooks(hinted=lambda: hinted), params, between_passes=guest)
    assert stats.passes == 2  # pass 1 and the final one
    assert stats.skipped["free-page-hint"] == 64 * 2  # pass 1 (all pages wanted) and the final pass
    assert all(dst.page(pfn) == src.page(pfn) for pfn in range(16))


def test_a_dirty_page_skipped_as_hinted_is_not_wanted_again_in_the_next_pass(
    no_kvm_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM_CLEAR_DIRTY_LOG per chunk: page 5 is written in pass 1 after its chunk was cleared (its bit stays set
    in KVM), so pass 2 wants it and its clear hands the bit out again; the guest hints it free right after that
    clear, and pass 2 skips it. The skip decided its fate for every write before the clear: it is not wanted
    again in the final pass (before: its stale bit made it come back one pass more)."""
    recorder = PassRecorder(monkeypatch)
    src, dst = FakeMachine(manual_dirty_log=True), FakeMachine()
    for pfn in range(16):
        src.guest_write(pfn, b"d" * PAGE_SIZE)
    hint = np.zeros(PAGES, dtype=bool)
    hint[5] = True
    written: list[int] = []

    def hinted() -> np.ndarray:  # after each chunk's clear
        if recorder.number == 1 and not written:
            src.guest_write(5, b"w" * PAGE_SIZE)  # pass 1, after its chunk's clear: KVM logs it
            written.append(5)
        return hint if recorder.number >= 2 else np.zeros(0, dtype=bool)

    params = MigrationParameters(max_bandwidth=1 << 20, downtime_limit_ms=0, max_passes=5)
    stats = migrate(src, dst, SourceHooks(hinted=hinted), params)
    assert 5 in recorder.wanted[1]  # pass 2 wants it (written after its chunk was cleared in pass 1)
    assert all(5 not in wanted for wanted in recorder.wanted[2:]), recorder.wanted
    assert stats.skipped["free-page-hint"] == 1
    assert stats.dirty_log == "manual-protect"



class GuestWriter:
    """A guest process that keeps writing a counter into pages of the machine it runs on (RAM and plugged
    virtio-mem), as a vCPU would: each write is logged by the (fake) KVM. Parking it (`park`) is what quiescing
    the machine does to its vCPUs; after a migration the writer goes on on the destination (`move_to`)."""

    def __init__(self, pfns: list[int]) -> None:
        self.pfns = pfns
        self.machine: FakeMachine | None = None
        self.writes = 0
        self.gate = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="guest-writer", daemon=True)

    def _loop(self) -> None:
        rng = random.Random(9)
        while not self._stop.is_set():
            with self.gate:
                if self.machine is not None:
                    pfn = rng.choice(self.pfns)
                    self.writes += 1
                    self.machine.guest_write(pfn, struct.pack("<QQ", pfn, self.writes) * (PAGE_SIZE // 16))
            time.sleep(0.0002)

    def move_to(self, machine: FakeMachine) -> None:
        with self.gate:
            self.machine = machine
        if not self._thread.is_alive():
            self._thread.start()

    def park(self) -> None:
        with self.gate:  # a write under way finishes first
            self.machine = None

    def wait_for_writes(self, count: int) -> None:
        """Block (the migration's thread, at a pass's start) until the guest wrote `count` pages more (unless it
        is parked: the final pass)."""
        if self.machine is None:
            return
        target, deadline = self.writes + count, time.monotonic() + 10
        while self.writes < target and time.monotonic() < deadline:
            time.sleep(0.001)
        assert self.writes >= target, "the guest writer stalled"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def same_memory(dst: FakeMachine, src: FakeMachine) -> None:
    """Every RAM page and every plugged virtio-mem page of `dst` equals `src`'s; the plugged blocks agree."""
    plugged = src.devices[0].device.plugged_ranges()
    assert dst.devices[0].device.plugged_ranges() == plugged
    pfns = [*range(PAGES), *(pfn for gpa, size in plugged for pfn in range(gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE))]
    different = [pfn for pfn in pfns if dst.page(pfn) != src.page(pfn)]
    assert not different, f"{len(different)} pages differ, the first {different[:8]}"


def test_a_to_b_and_back_to_a_with_a_guest_writing_during_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A -> B, then B -> A (a new process on A's side, as `memvisor run --incoming` always is), with the guest
    writing all along: the pages it writes during a pass go again in the next one, its vCPUs are parked for
    the final pass, and each destination ends with the memory of its source (RAM and plugged virtio-mem) and
    the same plugged blocks. A logs with KVM_CLEAR_DIRTY_LOG per chunk, B with KVM_GET_DIRTY_LOG's clearing."""
    import memvisor.vmm.snapshot as snapshot

    fake_machine_state(monkeypatch)
    a = FakeMachine(vmem=True, manual_dirty_log=True)
    plug(a, 2)
    vmem_pfn = a.devices[0].device.addr // PAGE_SIZE
    hot = [*range(0, PAGES, 4), *range(vmem_pfn, vmem_pfn + 2 * VMEM_BLOCK // PAGE_SIZE, 8)]
    for pfn in hot:
        a.guest_write(pfn, struct.pack("<Q", pfn) * (PAGE_SIZE // 8))
    writer = GuestWriter(hot)

    @contextlib.contextmanager
    def quiesced(machine: Any) -> Iterator[None]:
        writer.park()  # the source stays paused after its migration ("postmigrate"): the writer moves on
        yield

    monkeypatch.setattr(snapshot, "quiesced", quiesced)
    params = MigrationParameters(max_bandwidth=16 << 20, downtime_limit_ms=0, max_passes=3)
    writer.move_to(a)
    try:
        source_machine = a
        for destination in (FakeMachine(vmem=True), FakeMachine(vmem=True, manual_dirty_log=True)):  # B, new A
            sent_before = writer.writes
            stats = migrate(source_machine, destination, params=params,
                            between_passes=lambda number: writer.wait_for_writes(20))  # fmt: skip
            assert writer.machine is None  # parked for the final pass, never resumed on the source
            same_memory(destination, source_machine)
            assert destination.loaded == {"fake-state": 0}
            assert 2 <= stats.passes <= 4  # 1 to 3 passes with the guest writing, then the final one
            assert writer.writes - sent_before >= 20 * (stats.passes - 1)
            assert stats.normal > len(hot)  # pages written during the passes went again
            writer.move_to(destination)
            source_machine = destination
        assert stats.dirty_log == "kvm-clears"
    finally:
        writer.stop()


def test_the_final_pass_clears_no_dirty_log_and_the_stop_phase_is_timed_by_step(no_kvm_state: None) -> None:
    """The final pass runs with the vCPUs parked: its chunks are not cleared in KVM's log (each clear reads
    the whole bitmap), the earlier passes' are. Each step of the stop phase is timed in `downtime_parts`."""
    src, dst = FakeMachine(manual_dirty_log=True), FakeMachine()
    for pfn in range(16):
        src.guest_write(pfn, b"d" * PAGE_SIZE)
    clears: list[int] = []
    current = [0]
    clear = src.dirty_tracker.clear

    def counted(gpa: int, size: int) -> None:
        clears.append(current[0])
        clear(gpa, size)

    src.dirty_tracker.clear = counted  # type: ignore[method-assign]

    def between(number: int) -> None:
        current[0] = number

    stats = migrate(src, dst, params=MigrationParameters(max_bandwidth=0), between_passes=between)
    assert stats.passes == 2
    assert set(clears) == {1}
    assert dst.page(3) == b"d" * PAGE_SIZE
    parts = stats.downtime_parts
    assert list(parts) == ["expected", "pause", "dirty-sync", "pages", "capture", "send-state", "destination", "release"]
    assert sum(v for k, v in parts.items() if k != "expected") <= stats.downtime_ms + 7
