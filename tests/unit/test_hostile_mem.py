"""A hostile guest against virtio-mem: unplugged blocks hold no host memory whatever the guest does (issue 12 item 2).

Unplugged blocks are PROT_NONE in the host mapping (KVM cannot fault them in: the guest's access stops the VM),
refused to every device buffer, and UNPLUG_ALL / a system reset give back the whole region.
"""

from __future__ import annotations

import os

import pytest

from memvisor.devices.mem.protocol import VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG_ALL, VIRTIO_MEM_RESP_ACK
from memvisor.memory.guest_memory import GuestMemoryError, MemoryRegion
from memvisor.virtio.queue import VIRTQ_DESC_F_WRITE, VirtqueueError
from memvisor.virtio.testing import standalone_queue, test_memory
from tests.unit.test_virtio_mem import BLOCK, REGION, VMEM_GPA, Setup

PAGE = 4096


def _protection(addr: int) -> str:
    """The permissions ("rw-s", "---s") of the host mapping holding `addr`, from /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= addr < end:
                return perms
    raise AssertionError(f"{addr:#x} is not mapped")


def test_unplugged_blocks_are_inaccessible_on_the_host_and_plugged_ones_are_not() -> None:
    s = Setup()
    base = s.region.host_addr
    assert _protection(base) == "---s" and _protection(base + REGION - PAGE) == "---s"
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 4 * BLOCK, 2)[0] == VIRTIO_MEM_RESP_ACK
    assert _protection(base + 4 * BLOCK) == "rw-s" and _protection(base + 6 * BLOCK - PAGE) == "rw-s"
    assert _protection(base + 6 * BLOCK) == "---s" and _protection(base + 4 * BLOCK - PAGE) == "---s"
    s.memory.write(VMEM_GPA + 4 * BLOCK, b"plugged")
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0)[0] == VIRTIO_MEM_RESP_ACK
    assert _protection(base + 4 * BLOCK) == "---s"
    assert s.memory.allocated_bytes(s.region) == 0


def test_guest_memory_refuses_unplugged_blocks_so_no_device_can_touch_them() -> None:
    s = Setup()
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ACK
    assert s.memory.contains(VMEM_GPA, BLOCK)
    assert not s.memory.contains(VMEM_GPA + BLOCK, PAGE)
    assert not s.memory.contains(VMEM_GPA + BLOCK - 8, 16)  # straddling into an unplugged block
    for access in (lambda: s.memory.read(VMEM_GPA + BLOCK, 1), lambda: s.memory.write(VMEM_GPA + BLOCK, b"x"),
                   lambda: s.memory.discard(VMEM_GPA + BLOCK, PAGE)):
        with pytest.raises(GuestMemoryError, match="unplugged"):
            access()
    assert s.memory.allocated_bytes(s.region) == 0


def test_a_descriptor_into_unplugged_memory_is_refused_like_one_outside_ram() -> None:
    memory = test_memory()
    s = Setup(region=MemoryRegion.memfd(VMEM_GPA, REGION, "vmem"))
    memory.add(s.region)  # the same region in a second address space, behind a bare queue
    dq, sq = standalone_queue(8, memory)
    dq.write_desc(0, VMEM_GPA + 8 * BLOCK, PAGE, VIRTQ_DESC_F_WRITE)
    dq.publish(0)
    with pytest.raises(VirtqueueError, match="outside guest RAM") as info:
        sq.pop()
    assert info.value.head == 0
    assert memory.allocated_bytes(s.region) == 0


def test_unplug_all_and_system_reset_discard_the_whole_region() -> None:
    """Without UNPLUGGED_INACCESSIBLE a guest may touch unplugged blocks: UNPLUG_ALL and reset still free them."""
    s = Setup(unplugged_inaccessible=False)
    s.driver.init(features=s.driver.device_features())
    s.queue = s.driver.queues[0]
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ACK
    assert s.region.fd is not None
    os.pwrite(s.region.fd, b"x" * (8 * BLOCK), 16 * BLOCK)  # what the guest wrote into unplugged blocks
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0)[0] == VIRTIO_MEM_RESP_ACK
    assert s.memory.allocated_bytes(s.region) == 0
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ACK
    os.pwrite(s.region.fd, b"x" * (8 * BLOCK), 16 * BLOCK)
    s.device.system_reset()
    assert s.memory.allocated_bytes(s.region) == 0
