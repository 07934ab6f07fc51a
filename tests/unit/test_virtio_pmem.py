"""virtio-pmem through the virtio-mmio transport and a driver writing real descriptors (virtio 1.2 5.19)."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.devices.pmem import PmemError, VirtioPmemDevice
from memvisor.devices.pmem.protocol import REQUEST, RESPONSE, VIRTIO_PMEM_REQ_TYPE_FLUSH
from memvisor.errors import UsageError
from memvisor.memory.guest_memory import GuestMemoryError, MemoryRegion
from memvisor.virtio.device import STATUS_DEVICE_NEEDS_RESET, VIRTIO_ID_PMEM, VirtioDeviceError
from memvisor.virtio.testing import VirtioDriver, attach, test_memory

MIB = 1 << 20
PMEM_GPA = 1 << 30
SIZE = 4 * MIB
FLUSH = REQUEST.pack(VIRTIO_PMEM_REQ_TYPE_FLUSH)


class RecordingFsync:
    """os.fsync that records the fds it synced; optionally blocks, fails or sleeps."""

    def __init__(self, fail: OSError | None = None, gate: threading.Event | None = None, delay: float = 0.0):
        self.fds: list[int] = []
        self.threads: list[str] = []
        self.fail = fail
        self.gate = gate
        self.delay = delay

    def __call__(self, fd: int) -> None:
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        os.fsync(fd)
        self.fds.append(fd)


class Setup:
    def __init__(self, path: Path, *, readonly: bool = False, fsync: RecordingFsync | None = None,
                 region_readonly: bool = False, content: bytes | None = None):
        if not path.exists():
            path.write_bytes(content if content is not None else os.urandom(4096) + bytes(SIZE - 4096))
        self.path = path
        self.memory = test_memory()
        self.region = MemoryRegion.file(PMEM_GPA, path, SIZE, readonly=region_readonly, name="pmem")
        self.memory.add(self.region)
        self.fsync = fsync or RecordingFsync()
        self.device = VirtioPmemDevice(self.region, readonly=readonly, fsync=self.fsync)
        self.driver: VirtioDriver = attach(self.device, self.memory)
        self.queue = self.driver.queues[0]

    def submit(self, out: list[bytes], in_sizes: list[int]) -> int:
        head = self.queue.add_buffer(out, in_sizes)
        self.queue.kick()
        return head

    def answer(self, head: int) -> tuple[int, bytes]:
        assert self.device.wait_idle(10)
        used = self.queue.get_used()
        assert [h for h, _, _ in used] == [head]
        return used[0][1], used[0][2]

    def flush(self) -> int:
        written, data = self.answer(self.submit([FLUSH], [RESPONSE.size]))
        assert written == RESPONSE.size
        return int(RESPONSE.unpack(data)[0])

    @property
    def broken(self) -> bool:
        return bool(self.driver.status & STATUS_DEVICE_NEEDS_RESET)


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path / "pmem.img")
    yield setup
    setup.device.close()


def test_identity_and_config(s: Setup) -> None:
    assert s.driver.read_reg(0x008) == VIRTIO_ID_PMEM == 27
    assert s.driver.read_config_u64(0) == PMEM_GPA
    assert s.driver.read_config_u64(8) == SIZE
    assert s.device.read_config(12, 8) == (SIZE >> 32).to_bytes(4, "little") + bytes(4)
    assert s.device.read_config(-1, 2) == bytes(2)
    s.driver.write_config(0, b"\0" * 8)  # ignored: the config is read-only
    assert s.driver.read_config_u64(0) == PMEM_GPA and not s.broken


def test_flush_fsyncs_the_file_on_a_worker_and_answers_zero(s: Setup) -> None:
    s.memory.write(PMEM_GPA + 8192, b"persist me")  # the guest writes through its DAX mapping
    irqs = s.driver.irq_count
    assert s.flush() == 0
    assert s.fsync.fds == [s.region.fd]
    assert s.fsync.threads[0].startswith("pmem-flush") and s.fsync.threads[0] != threading.current_thread().name
    with open(s.path, "rb") as f:
        f.seek(8192)
        assert f.read(10) == b"persist me"
    assert s.driver.irq_count == irqs + 1
    counters = s.device.counters
    assert counters["flush_requests"] == 1 and counters["flushes_ok"] == 1 and counters["flush_errors"] == 0
    assert s.device.flush_seconds_total >= 0 and not s.broken


def test_flush_does_not_block_the_kicking_vcpu(tmp_path: Path) -> None:
    gate = threading.Event()
    setup = Setup(tmp_path / "img", fsync=RecordingFsync(gate=gate))
    try:
        head = setup.submit([FLUSH], [RESPONSE.size])  # returns while fsync waits on the gate
        assert setup.queue.used_idx() == 0
        assert setup.queue.get_used() == []
        gate.set()
        written, data = setup.answer(head)
        assert written == 4 and RESPONSE.unpack(data)[0] == 0
    finally:
        gate.set()
        setup.device.close()


def test_flush_time_is_counted(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "img", fsync=RecordingFsync(delay=0.02))
    assert setup.flush() == 0
    assert setup.device.counters["flush_microseconds_total"] >= 20_000
    assert setup.device.flush_seconds_total >= 0.02
    setup.device.close()


def test_fsync_failure_answers_minus_one(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "img", fsync=RecordingFsync(fail=OSError(errno.EIO, "I/O error")))
    assert setup.flush() == -1
    assert setup.device.counters["flush_errors"] == 1 and setup.device.counters["flushes_ok"] == 0
    assert setup.flush() == -1  # the device keeps working
    assert not setup.broken
    setup.device.close()


def test_several_flushes_in_one_kick_all_complete(s: Setup) -> None:
    heads = [s.queue.add_buffer([FLUSH], [RESPONSE.size], indirect=bool(i % 2)) for i in range(5)]
    s.queue.kick()
    assert s.device.wait_idle(10)
    used = s.queue.get_used()
    assert sorted(h for h, _, _ in used) == sorted(heads)
    assert all(RESPONSE.unpack(d)[0] == 0 for _, _, d in used)
    assert len(s.fsync.fds) == 5


# --- read-only mode ------------------------------------------------------------------------------------

def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.mark.parametrize("region_readonly", [True, False])
def test_read_only_mode_never_changes_the_file(tmp_path: Path, region_readonly: bool) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(os.urandom(SIZE))
    before = _digest(path)
    setup = Setup(path, readonly=True, region_readonly=region_readonly)
    assert setup.device.readonly
    if region_readonly:
        with pytest.raises(GuestMemoryError):
            setup.memory.write(PMEM_GPA, b"dropped")
    assert setup.flush() == 0
    assert setup.fsync.fds == [] and setup.fsync.threads == []  # nothing synced, no worker
    setup.device.close()
    setup.region.close()
    assert _digest(path) == before


def test_read_only_region_implies_read_only_device(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(SIZE))
    region = MemoryRegion.file(PMEM_GPA, path, SIZE, readonly=True)
    assert VirtioPmemDevice(region).readonly
    region.close()


# --- hostile input (docs/HOSTILE-INPUT.md) ----------------------------------------------------------------------

@pytest.mark.parametrize("out", [
    [b"\0\0\0"],                 # too short
    [b"\0" * 8],                 # too long
    [b""],                       # empty
    [REQUEST.pack(1)],           # unknown type
    [REQUEST.pack(0xFFFF_FFFF)],
    [b"\0\0", b"\0\0\0"],        # 5 bytes over two descriptors
])
def test_malformed_request_answers_minus_one(s: Setup, out: list[bytes]) -> None:
    written, data = s.answer(s.submit(out, [RESPONSE.size]))
    assert written == 4 and RESPONSE.unpack(data)[0] == -1
    assert s.fsync.fds == []
    assert s.device.counters["bad_requests"] == 1 and s.device.counters["flush_requests"] == 0
    assert not s.broken and s.queue.outstanding == 0


def test_request_split_over_two_descriptors_is_a_flush(s: Setup) -> None:
    written, data = s.answer(s.submit([FLUSH[:2], FLUSH[2:]], [2, 2]))
    assert written == 4 and RESPONSE.unpack(data)[0] == 0 and len(s.fsync.fds) == 1


@pytest.mark.parametrize("in_sizes", [[], [3], [0], [1, 2]])
def test_missing_response_buffer_returns_the_head_unanswered(s: Setup, in_sizes: list[int]) -> None:
    written, _ = s.answer(s.submit([FLUSH], in_sizes))
    assert written == 0 and s.fsync.fds == []
    assert s.device.counters["bad_requests"] == 1 and s.queue.outstanding == 0 and not s.broken


def test_only_writable_buffer_is_a_bad_request(s: Setup) -> None:
    written, data = s.answer(s.submit([], [RESPONSE.size]))
    assert written == 4 and RESPONSE.unpack(data)[0] == -1


def test_ring_broken_while_flushing_marks_the_device_broken(tmp_path: Path) -> None:
    gate = threading.Event()
    setup = Setup(tmp_path / "img", fsync=RecordingFsync(gate=gate))
    setup.submit([FLUSH], [RESPONSE.size])
    setup.driver.transport.queues[0].device_addr = 2**48  # the used ring is gone by the time fsync ends
    gate.set()
    assert setup.device.wait_idle(10)
    assert setup.broken
    assert "VirtqueueError" in (setup.driver.transport.last_error or "")
    setup.device.close()


def test_reset_during_a_flush_drops_the_answer_and_stops_the_worker(tmp_path: Path) -> None:
    gate = threading.Event()
    setup = Setup(tmp_path / "img", fsync=RecordingFsync(gate=gate))
    setup.submit([FLUSH], [RESPONSE.size])
    started = time.monotonic()
    setup.driver.write_reg(0x070, 0)  # driver resets the device: does not wait for the running fsync
    assert time.monotonic() - started < 1 and not gate.is_set()
    gate.set()
    deadline = time.monotonic() + 10
    while any(t.name.startswith("pmem-flush") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert setup.queue.used_idx() == 0  # the answer went nowhere
    assert setup.device.counters["flushes_ok"] == 1
    assert not any(t.name.startswith("pmem-flush") for t in threading.enumerate())
    setup.driver.init()  # the device works again after re-initialisation
    setup.queue = setup.driver.queues[0]
    assert setup.flush() == 0
    setup.device.close()
    assert not any(t.name.startswith("pmem-flush") for t in threading.enumerate())


def test_notify_before_activation_or_on_another_queue_does_nothing(s: Setup) -> None:
    s.device.notify(3)
    assert s.device.counters["flush_requests"] == 0


# --- construction ----------------------------------------------------------------------------------

def test_activation_without_a_queue_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(SIZE))
    memory = test_memory()
    region = MemoryRegion.file(PMEM_GPA, path, SIZE)
    memory.add(region)
    device = VirtioPmemDevice(region)
    driver = attach(device, memory, queue_sizes=[0])
    assert driver.status & STATUS_DEVICE_NEEDS_RESET
    with pytest.raises(PmemError):
        device.activate(memory, [], 0)
    assert issubclass(PmemError, VirtioDeviceError)


@pytest.mark.parametrize(("gpa", "size", "words"), [
    (PMEM_GPA + 4096, SIZE, "aligned"),
    (PMEM_GPA, SIZE + 4096, "multiple of 2M"),
])
def test_bad_layouts_are_refused_with_a_one_line_fix(tmp_path: Path, gpa: int, size: int, words: str) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(size))
    region = MemoryRegion.file(gpa, path, size)
    with pytest.raises(UsageError, match=words) as info:
        VirtioPmemDevice(region)
    assert "\n" not in str(info.value)
    region.close()


def test_memory_without_a_file_is_refused() -> None:
    region = MemoryRegion.anonymous(PMEM_GPA, SIZE)
    with pytest.raises(UsageError, match="file"):
        VirtioPmemDevice(region)
    region.close()
