"""Property tests: whatever bytes and buffers a guest puts on the virtio-mem queue, the device answers
within the specification, returns every head, never raises and keeps its books consistent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.mem import VirtioMemDevice
from memvisor.devices.mem.protocol import RESPONSE, MemRequest
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.virtio.device import STATUS_DEVICE_NEEDS_RESET
from memvisor.virtio.testing import attach, test_memory

MIB = 1 << 20
BLOCK = 2 * MIB
VMEM_GPA = 1 << 32
REGION = 256 * MIB
REQUESTED = 32 * MIB

# Requests near the interesting edges: the region, its blocks, 2**64.
addresses = st.one_of(
    st.integers(0, REGION // BLOCK + 2).map(lambda i: VMEM_GPA + i * BLOCK),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, VMEM_GPA - BLOCK, 2**64 - BLOCK, VMEM_GPA + 4096]),
)
structured = st.builds(lambda t, a, n: MemRequest(t, a, n).encode(),
                       st.integers(0, 5), addresses, st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)))
raw = st.binary(min_size=0, max_size=40)
chains = st.tuples(st.one_of(structured, structured, raw),
                   st.lists(st.integers(0, 16), min_size=0, max_size=3),
                   st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(chains, min_size=1, max_size=12), st.integers(0, REGION // BLOCK).map(lambda n: n * BLOCK))
def test_random_requests_never_break_the_device(requests: list[tuple[bytes, list[int], bool]], requested: int) -> None:
    memory = test_memory()
    region = MemoryRegion.memfd(VMEM_GPA, REGION, "vmem")
    memory.add(region)
    device = VirtioMemDevice(region, block_size=BLOCK, requested_size=requested)
    driver = attach(device, memory)
    queue = driver.queues[0]
    try:
        for data, in_sizes, indirect in requests:
            out = [data] if data else []
            if not out and not in_sizes:
                in_sizes = [RESPONSE.size]
            head = queue.add_buffer(out, in_sizes, indirect=indirect)
            queue.kick()
            used = queue.get_used()
            assert [h for h, _, _ in used] == [head]
            written, answer = used[0][1], used[0][2]
            if sum(in_sizes) >= RESPONSE.size:
                assert written == RESPONSE.size
                resp_type, state = RESPONSE.unpack(answer)
                assert resp_type in (0, 1, 2, 3) and state in (0, 1, 2)
            else:
                assert written == 0
            assert not driver.status & STATUS_DEVICE_NEEDS_RESET
            assert device.plugged_size <= requested
            assert device.plugged_size <= device.usable_region_size <= REGION
            assert device.plugged_size == driver.read_config_u64(40)
        counted = sum(device.counters[k] for k in ("acks", "nacks", "busy", "errors"))
        assert counted == len(requests)
    finally:
        memory.close()
