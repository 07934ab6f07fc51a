"""Property tests: random requests and buffers on the virtio-pmem queue never raise, never leak a head and
never make the device fsync anything but a well-formed FLUSH."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.devices.pmem.protocol import REQUEST, RESPONSE
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.virtio.device import STATUS_DEVICE_NEEDS_RESET
from memvisor.virtio.testing import attach, test_memory

PMEM_GPA = 1 << 30
SIZE = 2 << 20

outs = st.lists(st.one_of(st.binary(max_size=9), st.just(REQUEST.pack(0)), st.just(REQUEST.pack(1))),
                max_size=3)
chains = st.tuples(outs, st.lists(st.integers(0, 8), max_size=3), st.booleans())


@settings(max_examples=40, deadline=None)
@given(st.lists(chains, min_size=1, max_size=10), st.booleans())
def test_random_requests_never_break_the_device(requests: list[tuple[list[bytes], list[int], bool]],
                                                 fail: bool) -> None:
    synced: list[int] = []

    def fsync(fd: int) -> None:
        if fail:
            raise OSError(5, "I/O error")
        synced.append(fd)

    with tempfile.NamedTemporaryFile() as backing:
        backing.truncate(SIZE)
        memory = test_memory()
        region = MemoryRegion.file(PMEM_GPA, backing.name, SIZE)
        memory.add(region)
        device = VirtioPmemDevice(region, fsync=fsync)
        driver = attach(device, memory)
        queue = driver.queues[0]
        heads = []
        expected_flushes = 0
        try:
            for out, in_sizes, indirect in requests:
                if not out and not in_sizes:
                    in_sizes = [RESPONSE.size]
                heads.append(queue.add_buffer(out, in_sizes, indirect=indirect))
                if b"".join(out) == REQUEST.pack(0) and sum(in_sizes) >= RESPONSE.size:
                    expected_flushes += 1
            queue.kick()
            assert device.wait_idle(10)
            used = queue.get_used()
            assert sorted(h for h, _, _ in used) == sorted(heads)
            for _, written, answer in used:
                assert written in (0, RESPONSE.size)
                if written:
                    assert RESPONSE.unpack(answer)[0] in (0, -1)
            assert len(synced) == (0 if fail else expected_flushes)
            assert device.counters["flush_requests"] == expected_flushes
            assert not driver.status & STATUS_DEVICE_NEEDS_RESET
        finally:
            device.close()
            memory.close()
        assert os.path.getsize(backing.name) == SIZE
