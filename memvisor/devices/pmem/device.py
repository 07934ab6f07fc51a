"""The virtio-pmem device model (device id 27, virtio 1.2 section 5.19).

virtio-pmem exposes a host file as persistent memory: the file is mapped MAP_SHARED at `start` in guest
physical memory (outside e820 RAM, 2 MiB aligned) and the guest (nd_pmem, often with ext4 `-o dax`)
reads and writes it directly. The only request is FLUSH (le32 type 0 out, le32 ret in): the guest asks
that everything it wrote reach stable storage. The device fsyncs the backing file on its own worker
thread, so the vCPU thread that kicked the queue returns at once, and then answers 0, or -1 when fsync
failed. The worker pushes the used buffer and signals while holding the device lock.

Read-only mode: virtio-pmem has no read-only bit. The VMM maps the file read-only (and gives KVM a
read-only memslot, so guest writes are dropped); the device never writes the file, and a flush answers
success without syncing anything.

Malformed requests (readable part not exactly 4 bytes, unknown type) are answered -1; a chain without a
writable buffer of 4 bytes is returned with 0 bytes written. Both count in `bad_requests`. Nothing the
guest puts on the queue raises out of the device, apart from a malformed ring (VirtqueueError), which
the transport turns into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from memvisor.devices.pmem.protocol import (
    CONFIG,
    REQUEST,
    RESPONSE,
    RET_FAILED,
    RET_OK,
    VIRTIO_PMEM_REQ_TYPE_FLUSH,
)
from memvisor.errors import UsageError
from memvisor.memory.guest_memory import GuestMemoryError
from memvisor.units import format_size
from memvisor.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_PMEM,
    VirtioDevice,
    VirtioDeviceError,
    feature_bit,
)
from memvisor.virtio.queue import VirtqueueError

if TYPE_CHECKING:
    from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
    from memvisor.virtio.queue import DescriptorChain, SplitVirtqueue

log = logging.getLogger(__name__)

ALIGNMENT = 2 << 20  # Linux maps the device with huge pages and needs section-friendly alignment
QUEUE_SIZE = 128

COUNTER_NAMES = ("flush_requests", "flushes_ok", "flush_errors", "bad_requests", "flush_microseconds_total")

Fsync = Callable[[int], None]


class PmemError(VirtioDeviceError):
    """The virtio-pmem device cannot go on (e.g. the driver set DRIVER_OK without a request queue)."""


def _validate(region: MemoryRegion) -> None:
    if region.fd is None:
        raise UsageError(f"virtio-pmem region {region.name!r} has no backing file; give it a file to map")
    if region.gpa % ALIGNMENT:
        raise UsageError(f"virtio-pmem region at {region.gpa:#x} is not aligned to {format_size(ALIGNMENT)}; "
                         "place it at a multiple of 2M")
    if region.size <= 0 or region.size % ALIGNMENT:
        raise UsageError(f"virtio-pmem size {format_size(region.size)} is not a multiple of "
                         f"{format_size(ALIGNMENT)}; round the file size up to a multiple of 2M")


class VirtioPmemDevice(VirtioDevice):
    """virtio-pmem over the file-backed `region`; `readonly` (or a read-only region) never writes the file.

    `fsync` is the function that makes the file durable (os.fsync; tests inject failures through it).
    """

    device_id = VIRTIO_ID_PMEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, region: MemoryRegion, *, readonly: bool = False, fsync: Fsync = os.fsync):
        super().__init__()
        _validate(region)
        self.region = region
        self.readonly = readonly or region.readonly
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._fsync = fsync
        self._memory: GuestMemory | None = None
        self._queue: SplitVirtqueue | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._generation = 0  # bumped on reset: a flush finishing afterwards must not touch the new queue
        self._pending: set[concurrent.futures.Future[None]] = set()

    @property
    def start(self) -> int:
        return self.region.gpa

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def flush_seconds_total(self) -> float:
        return self.counters["flush_microseconds_total"] / 1e6

    # --- VirtioDevice -----------------------------------------------------------------------------------

    def device_features(self) -> int:
        return feature_bit(VIRTIO_F_VERSION_1)

    def read_config(self, offset: int, length: int) -> bytes:
        config = CONFIG.pack(self.start, self.size)
        if offset < 0 or length <= 0:
            return bytes(max(length, 0))
        return config[offset:offset + length].ljust(length, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """The configuration is read-only for the driver: writes are ignored."""
        log.debug("virtio-pmem: ignored driver write of %d bytes to config offset %d", len(data), offset)

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        if not queues or not queues[0].ready:
            raise PmemError("the guest driver set DRIVER_OK without setting up the virtio-pmem request queue")
        with self.lock:
            self._memory = memory
            self._queue = queues[0]

    def notify(self, queue_index: int) -> None:
        """Take the available requests: flushes go to the worker, malformed ones are answered at once."""
        with self.lock:
            queue = self._queue
            if queue is None or queue_index != 0:
                return
            self.drain(queue, lambda chain: self._take(queue, chain), fault_counter="bad_requests", error=PmemError)

    def reset(self) -> None:
        """Forget the queue; a flush still running finishes its fsync in the background and answers nobody.

        Reset never waits for host I/O: it runs on a vCPU under the transport lock, and an fsync can take
        seconds (every other vCPU touching the device would stall meanwhile).
        """
        self._stop_worker(wait=False)

    def close(self) -> None:
        """Stop the worker thread (waiting for a running fsync)."""
        self._stop_worker(wait=True)

    def _stop_worker(self, *, wait: bool) -> None:
        with self.lock:
            self._generation += 1
            self._queue = None
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)  # outside the lock: workers take it to answer

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no flush is in flight (for tests and orderly shutdown); True if none is left."""
        with self.lock:
            pending = set(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        return not not_done

    # --- requests ---------------------------------------------------------------------------------------

    def _take(self, queue: SplitVirtqueue, chain: DescriptorChain) -> int | None:
        """Handle one chain: the bytes written to answer it now, or None when the worker will answer."""
        memory = self._memory
        assert memory is not None
        if chain.writable_length < RESPONSE.size:
            log.debug("virtio-pmem: request without a 4-byte response buffer, returned unanswered")
            self.count("bad_requests")
            return 0
        try:
            data = chain.read_all(memory, REQUEST.size + 1)
        except (GuestMemoryError, VirtqueueError):
            data = b""
        if len(data) != REQUEST.size or REQUEST.unpack(data)[0] != VIRTIO_PMEM_REQ_TYPE_FLUSH:
            log.debug("virtio-pmem: malformed request of %d bytes", len(data))
            self.count("bad_requests")
            return self._response(chain, RET_FAILED)
        self.count("flush_requests")
        if self.readonly:  # nothing can be dirty: the guest cannot write the file
            self.count("flushes_ok")
            return self._response(chain, RET_OK)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmem-flush")
        future = self._executor.submit(self._flush, queue, chain, self._generation)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return None

    def _flush(self, queue: SplitVirtqueue, chain: DescriptorChain, generation: int) -> None:
        """Worker thread: fsync the file, then answer under the device lock."""
        started = time.perf_counter()
        try:
            self._fsync(self.region.fd)  # type: ignore[arg-type]  # checked in _validate
            ret = RET_OK
        except Exception as err:
            log.warning("virtio-pmem: fsync of %r failed: %s", self.region.name, err)
            ret = RET_FAILED
        elapsed_us = int((time.perf_counter() - started) * 1e6)
        with self.lock:
            self.count("flush_microseconds_total", elapsed_us)
            self.count("flushes_ok" if ret == RET_OK else "flush_errors")
            if generation != self._generation:
                return  # the device was reset meanwhile: the chain belongs to a queue that no longer exists
            try:
                self._answer(queue, chain, ret)
                self.signal_used(queue)
            except Exception as err:  # a ring the guest broke meanwhile: mark the device broken
                self.report_failure(err)

    def _response(self, chain: DescriptorChain, ret: int) -> int:
        """Write the response `ret` into the chain; the bytes written (0 if its buffer broke meanwhile)."""
        memory = self._memory
        assert memory is not None
        try:
            return chain.write_all(memory, RESPONSE.pack(ret))
        except (GuestMemoryError, VirtqueueError):
            return 0

    def _answer(self, queue: SplitVirtqueue, chain: DescriptorChain, ret: int) -> None:
        queue.push_used(chain.head, self._response(chain, ret))
