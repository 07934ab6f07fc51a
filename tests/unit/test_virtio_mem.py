"""virtio-mem through the virtio-mmio transport and a driver that writes real descriptors (virtio 1.2 5.15)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from memvisor.devices.mem import MemError, VirtioMemDevice
from memvisor.devices.mem.device import USABLE_EXTENT
from memvisor.devices.mem.protocol import (
    CONFIG,
    RESPONSE,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    MemRequest,
)
from memvisor.errors import UsageError
from memvisor.memory.guest_memory import GuestMemory, GuestMemoryError, MemoryRegion
from memvisor.virtio.device import STATUS_DEVICE_NEEDS_RESET, VIRTIO_MMIO_INT_CONFIG, VirtioDeviceError
from memvisor.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from memvisor.virtio.testing import DriverError, VirtioDriver, attach, test_memory

MIB = 1 << 20
BLOCK = 2 * MIB
VMEM_GPA = 1 << 32
REGION = 512 * MIB
PAGE = 4096

# Offsets in struct virtio_mem_config (virtio 1.2 section 5.15.4).
OFF_BLOCK_SIZE, OFF_NODE_ID, OFF_ADDR, OFF_REGION_SIZE = 0, 8, 16, 24
OFF_USABLE, OFF_PLUGGED, OFF_REQUESTED = 32, 40, 48


class Setup:
    """A device over a fresh memfd region, attached to a driver, with the hooks recorded."""

    def __init__(self, requested: int = 64 * MIB, region: MemoryRegion | None = None, **options: object):
        self.memory = test_memory()
        self.region = region or MemoryRegion.memfd(VMEM_GPA, REGION, "vmem")
        self.memory.add(self.region)
        self.plugged: list[tuple[int, int]] = []
        self.unplugged: list[tuple[int, int]] = []
        self.sizes: list[int] = []
        self.device = VirtioMemDevice(
            self.region, block_size=options.pop("block_size", BLOCK), requested_size=requested,  # type: ignore[arg-type]
            on_plug=lambda g, s: self.plugged.append((g, s)), on_unplug=lambda g, s: self.unplugged.append((g, s)),
            on_size_change=self.sizes.append, **options,  # type: ignore[arg-type]
        )
        self.driver: VirtioDriver = attach(self.device, self.memory)
        self.queue = self.driver.queues[0]

    def send(self, data: bytes, in_sizes: tuple[int, ...] = (RESPONSE.size,)) -> tuple[int, bytes]:
        """One chain made available and kicked; (written, response bytes)."""
        head = self.queue.add_buffer([data], list(in_sizes))
        self.queue.kick()
        used = self.queue.get_used()
        assert [h for h, _, _ in used] == [head], "the device must return exactly this head"
        return used[0][1], used[0][2]

    def request(self, req_type: int, addr: int = VMEM_GPA, nb_blocks: int = 1) -> tuple[int, int]:
        """(response type, state) of one request."""
        written, data = self.send(MemRequest(req_type, addr, nb_blocks).encode())
        assert written == RESPONSE.size
        resp_type, state = RESPONSE.unpack(data)
        return resp_type, state

    def config(self, offset: int) -> int:
        return self.driver.read_config_u64(offset)

    @property
    def broken(self) -> bool:
        return bool(self.driver.status & STATUS_DEVICE_NEEDS_RESET)


@pytest.fixture
def s() -> Setup:
    return Setup()


# --- configuration and features -----------------------------------------------------------------------

def test_config_layout_matches_the_specification(s: Setup) -> None:
    assert CONFIG.size == 56
    assert s.config(OFF_BLOCK_SIZE) == BLOCK
    assert s.config(OFF_ADDR) == VMEM_GPA
    assert s.config(OFF_REGION_SIZE) == REGION
    assert s.config(OFF_REQUESTED) == 64 * MIB
    assert s.config(OFF_PLUGGED) == 0
    assert s.config(OFF_USABLE) == 64 * MIB + USABLE_EXTENT
    assert s.driver.read_config(OFF_NODE_ID, 2) == b"\0\0"


def test_usable_region_is_capped_at_the_region_and_zero_without_request() -> None:
    assert Setup(requested=REGION - BLOCK).config(OFF_USABLE) == REGION
    assert Setup(requested=0).config(OFF_USABLE) == 0


def test_usable_region_is_rounded_up_to_a_large_block() -> None:
    region = MemoryRegion.memfd(VMEM_GPA, 1024 * MIB, "vmem")
    setup = Setup(requested=512 * MIB, region=region, block_size=512 * MIB)
    assert setup.config(OFF_USABLE) == 1024 * MIB  # min(1G, 512M + 256M) = 768M, rounded up to 512M blocks


def test_features_name_the_numa_node_only_when_given() -> None:
    plain = Setup()
    assert plain.driver.features >> VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE & 1
    assert not plain.driver.features >> VIRTIO_MEM_F_ACPI_PXM & 1
    numa = Setup(node_id=3)
    assert numa.driver.features >> VIRTIO_MEM_F_ACPI_PXM & 1
    assert numa.driver.read_config(OFF_NODE_ID, 2) == struct.pack("<H", 3)
    legacy = Setup(unplugged_inaccessible=False)
    assert not legacy.driver.features >> VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE & 1
    assert legacy.request(VIRTIO_MEM_REQ_PLUG)[0] == VIRTIO_MEM_RESP_ACK


def test_driver_refusing_unplugged_inaccessible_is_refused_at_features_ok() -> None:
    """As QEMU: FEATURES_OK does not stick, so a Linux 5.8-5.15 driver gives up instead of waiting forever."""
    memory = test_memory()
    region = MemoryRegion.memfd(VMEM_GPA, REGION, "vmem")
    memory.add(region)
    device = VirtioMemDevice(region, block_size=BLOCK, requested_size=64 * MIB)
    features = device.device_features() & ~(1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    with pytest.raises(DriverError, match="refused features"):
        attach(device, memory, features=features)
    assert device.counters["errors"] == 1


def test_activation_without_a_queue_fails_cleanly() -> None:
    memory = test_memory()
    region = MemoryRegion.memfd(VMEM_GPA, REGION, "vmem")
    memory.add(region)
    device = VirtioMemDevice(region, requested_size=0)
    driver = attach(device, memory, queue_sizes=[0])
    assert driver.status & STATUS_DEVICE_NEEDS_RESET
    with pytest.raises(MemError):
        device.activate(memory, [], 0)


def test_config_is_read_only_and_out_of_range_reads_are_zero(s: Setup) -> None:
    s.driver.write_config(OFF_REQUESTED, struct.pack("<Q", 0))
    assert s.config(OFF_REQUESTED) == 64 * MIB
    assert s.device.read_config(CONFIG.size - 2, 4) == s.device.config_bytes()[-2:] + b"\0\0"
    assert s.device.read_config(-4, 4) == bytes(4)
    assert s.device.read_config(0, 0) == b""
    assert not s.broken


# --- constructor validation ------------------------------------------------------------------------

@pytest.mark.parametrize(("gpa", "size", "block", "requested", "node", "words"), [
    (VMEM_GPA + 64 * MIB, REGION, BLOCK, 0, None, "128M"),
    (VMEM_GPA, REGION + 4096, BLOCK, 0, None, "multiple of the block"),
    (VMEM_GPA, REGION, 3 * MIB, 0, None, "power of two"),
    (VMEM_GPA, REGION, MIB, 0, None, "power of two"),
    (VMEM_GPA, REGION, BLOCK, MIB, None, "requested size"),
    (VMEM_GPA, REGION, BLOCK, REGION + BLOCK, None, "requested size"),
    (VMEM_GPA, REGION, BLOCK, -BLOCK, None, "requested size"),
    (VMEM_GPA, REGION, BLOCK, 0, 1 << 16, "NUMA node"),
])
def test_bad_layouts_are_refused_with_a_one_line_fix(
    gpa: int, size: int, block: int, requested: int, node: int | None, words: str,
) -> None:
    region = MemoryRegion.memfd(gpa, size, "vmem")
    try:
        with pytest.raises(UsageError) as info:
            VirtioMemDevice(region, block_size=block, requested_size=requested, node_id=node)
        message = str(info.value)
        assert words in message and "\n" not in message and ";" in message
    finally:
        region.close()


def test_read_only_region_is_refused(tmp_path: object) -> None:
    path = f"{tmp_path}/ro"
    with open(path, "wb") as f:
        f.truncate(REGION)
    region = MemoryRegion.file(VMEM_GPA, path, REGION, readonly=True)
    with pytest.raises(UsageError, match="read-only"):
        VirtioMemDevice(region)
    region.close()


# --- PLUG ------------------------------------------------------------------------------------------

def test_plug_acks_updates_plugged_size_and_calls_the_hooks(s: Setup) -> None:
    addr = VMEM_GPA + 8 * BLOCK
    assert s.request(VIRTIO_MEM_REQ_PLUG, addr, 2) == (VIRTIO_MEM_RESP_ACK, 0)
    assert s.device.plugged_size == 2 * BLOCK == s.config(OFF_PLUGGED)
    assert s.plugged == [(addr, 2 * BLOCK)]
    assert s.sizes == [2 * BLOCK]
    assert s.device.block_state(addr) and s.device.block_state(addr + BLOCK)
    assert not s.device.block_state(addr + 2 * BLOCK)
    assert s.device.counters["plug_requests"] == 1
    assert s.device.counters["bytes_plugged"] == 2 * BLOCK
    assert s.device.counters["acks"] == 1
    assert s.driver.irq_count >= 1 and not s.broken
    # plugged memory is usable through the guest's view
    s.memory.write(addr + 123, b"hello")
    assert s.memory.read(addr + 123, 5) == b"hello"


def test_plug_in_linux_4m_sub_blocks_over_2m_device_blocks(s: Setup) -> None:
    for i in range(16):  # 16 x 4 MiB = the whole 64 MiB requested
        assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + i * 4 * MIB, 2)[0] == VIRTIO_MEM_RESP_ACK
    assert s.device.plugged_size == 64 * MIB
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 64 * MIB, 2)[0] == VIRTIO_MEM_RESP_NACK


def test_plug_beyond_requested_size_is_nacked(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 33)[0] == VIRTIO_MEM_RESP_NACK  # 66 MiB > 64 MiB
    assert s.device.plugged_size == 0
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 32)[0] == VIRTIO_MEM_RESP_ACK
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 32 * BLOCK, 1)[0] == VIRTIO_MEM_RESP_NACK
    assert s.device.counters["nacks"] == 2
    assert s.plugged == [(VMEM_GPA, 32 * BLOCK)]
    assert not s.broken


def test_plug_of_plugged_blocks_is_an_error(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + BLOCK, 1)[0] == VIRTIO_MEM_RESP_ACK
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + BLOCK, 1)[0] == VIRTIO_MEM_RESP_ERROR
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 3)[0] == VIRTIO_MEM_RESP_ERROR  # overlaps it
    assert s.device.plugged_size == BLOCK
    assert s.device.counters["errors"] == 2


# --- UNPLUG ----------------------------------------------------------------------------------------

def test_unplug_acks_and_gives_the_memory_back_to_the_host(s: Setup) -> None:
    addr = VMEM_GPA + 4 * BLOCK
    assert s.request(VIRTIO_MEM_REQ_PLUG, addr, 4)[0] == VIRTIO_MEM_RESP_ACK
    before = s.memory.allocated_bytes(s.region)
    for offset in range(0, 4 * BLOCK, PAGE):  # the guest touches every page
        s.memory.write(addr + offset, b"\xaa")
    touched = s.memory.allocated_bytes(s.region)
    assert touched - before >= 4 * BLOCK
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, addr, 4)[0] == VIRTIO_MEM_RESP_ACK
    assert s.memory.allocated_bytes(s.region) <= touched - 4 * BLOCK
    with pytest.raises(GuestMemoryError, match="unplugged"):  # unplugged is inaccessible (issue 12)
        s.memory.read(addr, 1)
    assert s.device.plugged_size == 0 == s.config(OFF_PLUGGED)
    assert s.unplugged == [(addr, 4 * BLOCK)]
    assert s.sizes == [4 * BLOCK, 0]
    assert s.device.counters["bytes_unplugged"] == 4 * BLOCK
    assert s.device.counters["bytes_discarded"] == 4 * BLOCK


def test_partial_unplug_keeps_the_rest_plugged(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 4)[0] == VIRTIO_MEM_RESP_ACK
    s.memory.write(VMEM_GPA + 3 * BLOCK, b"keep")
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA + BLOCK, 2)[0] == VIRTIO_MEM_RESP_ACK
    assert s.memory.read(VMEM_GPA + 3 * BLOCK, 4) == b"keep"
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA, 4) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
    assert s.device.plugged_size == 2 * BLOCK


def test_unplug_of_unplugged_blocks_is_an_error(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ERROR
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ACK
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 2)[0] == VIRTIO_MEM_RESP_ERROR  # second one unplugged
    assert s.device.plugged_size == BLOCK and s.unplugged == []


def test_unplug_is_allowed_while_plugged_exceeds_requested(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 8)[0] == VIRTIO_MEM_RESP_ACK
    s.device.set_requested_size(4 * MIB)
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 8 * BLOCK, 1)[0] == VIRTIO_MEM_RESP_NACK
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 6)[0] == VIRTIO_MEM_RESP_ACK
    assert s.device.plugged_size == 4 * MIB


# --- UNPLUG_ALL ------------------------------------------------------------------------------------

def test_unplug_all_unplugs_every_run_and_shrinks_the_usable_region(s: Setup) -> None:
    for addr, n in ((VMEM_GPA, 2), (VMEM_GPA + 10 * BLOCK, 3), (VMEM_GPA + 30 * BLOCK, 1)):
        assert s.request(VIRTIO_MEM_REQ_PLUG, addr, n)[0] == VIRTIO_MEM_RESP_ACK
        s.memory.write(addr, b"x" * 64)
    assert s.device.plugged_ranges() == [(VMEM_GPA, 2 * BLOCK), (VMEM_GPA + 10 * BLOCK, 3 * BLOCK),
                                         (VMEM_GPA + 30 * BLOCK, BLOCK)]
    s.device.set_requested_size(0)
    assert s.config(OFF_USABLE) == 64 * MIB + USABLE_EXTENT  # only UNPLUG_ALL may shrink it
    generation = s.driver.read_reg(0xFC)
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0)[0] == VIRTIO_MEM_RESP_ACK
    assert s.device.plugged_size == 0 and s.config(OFF_USABLE) == 0 and s.device.plugged_ranges() == []
    assert s.driver.read_reg(0xFC) == generation  # no config notification for UNPLUG_ALL
    assert sorted(s.unplugged) == [(VMEM_GPA, 2 * BLOCK), (VMEM_GPA + 10 * BLOCK, 3 * BLOCK),
                                   (VMEM_GPA + 30 * BLOCK, BLOCK)]
    assert s.sizes[-1] == 0 and s.sizes.count(0) == 1
    assert s.memory.allocated_bytes(s.region) == 0  # the whole region is given back (issue 12)
    assert s.device.counters["unplug_all_requests"] == 1
    assert s.device.counters["bytes_discarded"] == 6 * BLOCK


def test_unplug_all_with_nothing_plugged_acks(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL, 0xDEAD, 7)[0] == VIRTIO_MEM_RESP_ACK  # data ignored
    assert s.sizes == [] and s.unplugged == []


# --- STATE -----------------------------------------------------------------------------------------

def test_state_reports_plugged_unplugged_and_mixed(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA, 4) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED)
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + BLOCK, 2)[0] == VIRTIO_MEM_RESP_ACK
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA + BLOCK, 2) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA, 4) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA + 3 * BLOCK, 1) == (VIRTIO_MEM_RESP_ACK,
                                                                       VIRTIO_MEM_STATE_UNPLUGGED)
    assert s.device.counters["state_requests"] == 4


# --- BUSY ------------------------------------------------------------------------------------------

def test_busy_device_answers_busy_and_changes_nothing(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ACK
    s.device.busy = True
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + BLOCK, 1)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA, 1) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)
    assert s.device.plugged_size == BLOCK and s.device.counters["busy"] == 3
    s.device.busy = False
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL)[0] == VIRTIO_MEM_RESP_ACK


def test_failing_kvm_mapping_answers_busy_and_rolls_back(s: Setup) -> None:
    def refuse(gpa: int, size: int) -> None:
        raise OSError("no memslot left")

    s.device.on_plug = refuse
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.device.plugged_size == 0 and s.device.counters["hook_failures"] == 1
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA, 1)[1] == VIRTIO_MEM_STATE_UNPLUGGED


def test_failing_unmap_answers_busy_and_keeps_blocks_plugged(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 2)[0] == VIRTIO_MEM_RESP_ACK
    s.memory.write(VMEM_GPA, b"data")

    def refuse(gpa: int, size: int) -> None:
        raise OSError("busy memslot")

    s.device.on_unplug = refuse
    assert s.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 2)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.request(VIRTIO_MEM_REQ_UNPLUG_ALL)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.device.plugged_size == 2 * BLOCK
    assert s.memory.read(VMEM_GPA, 4) == b"data"  # plugged memory is never modified


def test_failing_size_listener_does_not_break_the_request(s: Setup) -> None:
    def explode(size: int) -> None:
        raise RuntimeError("control plane gone")

    s.device.on_size_change = explode
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ACK
    assert s.device.counters["hook_failures"] == 1 and not s.broken


# --- requested size --------------------------------------------------------------------------------

def test_requested_size_change_raises_a_config_interrupt_and_bumps_generation(s: Setup) -> None:
    s.driver.ack_interrupt()
    generation = s.driver.read_reg(0xFC)
    irqs = s.driver.irq_count
    s.device.set_requested_size(384 * MIB)
    assert s.driver.read_reg(0xFC) != generation
    assert s.driver.irq_count == irqs + 1
    assert s.driver.ack_interrupt() & VIRTIO_MMIO_INT_CONFIG
    assert s.config(OFF_REQUESTED) == 384 * MIB == s.device.requested_size
    assert s.config(OFF_USABLE) == REGION  # 384M + 256M capped at the 512M region
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 200 * BLOCK, 1)[0] == VIRTIO_MEM_RESP_ACK


@pytest.mark.parametrize("size", [MIB, REGION + BLOCK, -BLOCK])
def test_bad_requested_size_is_refused(s: Setup, size: int) -> None:
    with pytest.raises(UsageError):
        s.device.set_requested_size(size)
    assert s.device.requested_size == 64 * MIB


# --- preallocation ---------------------------------------------------------------------------------

def test_prealloc_backs_plugged_blocks_at_once() -> None:
    setup = Setup(prealloc=True)
    before = setup.memory.allocated_bytes(setup.region)
    assert setup.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 4)[0] == VIRTIO_MEM_RESP_ACK
    assert setup.memory.allocated_bytes(setup.region) - before >= 4 * BLOCK
    assert setup.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 4)[0] == VIRTIO_MEM_RESP_ACK
    assert setup.memory.allocated_bytes(setup.region) <= before


def test_prealloc_of_anonymous_memory_touches_every_page() -> None:
    region = MemoryRegion.anonymous(VMEM_GPA, REGION, "vmem-anon")
    setup = Setup(prealloc=True, region=region)
    before = setup.memory.allocated_bytes(region)
    assert setup.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 2)[0] == VIRTIO_MEM_RESP_ACK
    assert setup.memory.allocated_bytes(region) - before >= 2 * BLOCK
    assert setup.request(VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA, 2)[0] == VIRTIO_MEM_RESP_ACK
    assert setup.memory.allocated_bytes(region) <= before


# --- reset -----------------------------------------------------------------------------------------

def test_virtio_reset_keeps_blocks_and_system_reset_unplugs_them(s: Setup) -> None:
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 3)[0] == VIRTIO_MEM_RESP_ACK
    s.memory.write(VMEM_GPA, b"survives")
    s.driver.init()  # the driver reloads: reset, handshake, new queue
    s.queue = s.driver.queues[0]
    assert s.config(OFF_PLUGGED) == 3 * BLOCK
    assert s.memory.read(VMEM_GPA, 8) == b"survives"
    assert s.request(VIRTIO_MEM_REQ_STATE, VMEM_GPA, 3)[1] == VIRTIO_MEM_STATE_PLUGGED
    s.device.system_reset()
    assert s.device.plugged_size == 0 and s.memory.allocated_bytes(s.region) == 0
    assert s.config(OFF_USABLE) == 64 * MIB + USABLE_EXTENT


def test_system_reset_before_activation_and_block_state_bounds() -> None:
    region = MemoryRegion.memfd(VMEM_GPA, REGION, "vmem")
    device = VirtioMemDevice(region, requested_size=BLOCK)
    device.system_reset()
    assert device.plugged_size == 0
    device.notify(0)  # no queue yet: nothing happens
    with pytest.raises(UsageError):
        device.block_state(VMEM_GPA - 1)
    region.close()


# --- hostile input (docs/HOSTILE-INPUT.md) ----------------------------------------------------------------------

@pytest.mark.parametrize(("addr", "nb_blocks"), [
    (VMEM_GPA + 4096, 1),                 # unaligned
    (VMEM_GPA + MIB, 2),                  # unaligned to the block, aligned to a page
    (VMEM_GPA, 0),                        # zero-sized
    (VMEM_GPA - BLOCK, 1),                # below the region
    (0, 1),                               # guest RAM, not the device's
    (VMEM_GPA + 64 * MIB + USABLE_EXTENT, 1),        # just past the usable region
    (VMEM_GPA + 64 * MIB + USABLE_EXTENT - BLOCK, 2),  # straddles its end
    (2**64 - BLOCK, 2),                   # addr + size wraps past 2**64
    (2**64 - BLOCK, 0xFFFF),              # and very far
    (VMEM_GPA, 0xFFFF),                   # far more blocks than the region has
])
@pytest.mark.parametrize("req_type", [VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_STATE])
def test_bad_ranges_are_answered_error(s: Setup, req_type: int, addr: int, nb_blocks: int) -> None:
    assert s.request(req_type, addr, nb_blocks)[0] == VIRTIO_MEM_RESP_ERROR
    assert s.device.plugged_size == 0 and s.plugged == [] and s.unplugged == []
    assert not s.broken and s.queue.outstanding == 0


@pytest.mark.parametrize("req_type", [4, 0x100, 0xFFFF])
def test_unknown_request_type_is_answered_error(s: Setup, req_type: int) -> None:
    assert s.request(req_type, VMEM_GPA, 1)[0] == VIRTIO_MEM_RESP_ERROR
    assert s.device.counters["errors"] == 1 and not s.broken


@pytest.mark.parametrize("length", [0, 1, 8, 23])
def test_short_request_is_answered_error(s: Setup, length: int) -> None:
    data = MemRequest(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1).encode()[:length]
    written, response = _only_writable(s, RESPONSE.size) if length == 0 else s.send(data)
    assert written == RESPONSE.size and RESPONSE.unpack(response)[0] == VIRTIO_MEM_RESP_ERROR
    assert s.device.plugged_size == 0 and not s.broken


def _only_writable(s: Setup, size: int) -> tuple[int, bytes]:
    head = s.queue.add_buffer([], [size])
    s.queue.kick()
    used = s.queue.get_used()
    assert [h for h, _, _ in used] == [head]
    return used[0][1], used[0][2]


@pytest.mark.parametrize("in_sizes", [(), (9,), (4, 4), (0,)])
def test_missing_response_buffer_returns_the_head_unanswered(s: Setup, in_sizes: tuple[int, ...]) -> None:
    written, _ = s.send(MemRequest(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1).encode(), in_sizes)
    assert written == 0
    assert s.device.plugged_size == 0  # nothing done that the driver cannot learn about
    assert s.device.counters["errors"] == 1 and s.queue.outstanding == 0 and not s.broken


def test_request_and_response_split_across_descriptors(s: Setup) -> None:
    data = MemRequest(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1).encode()
    written, response = s.send(data, (4, 6))
    head = s.queue.add_buffer([data[:5], data[5:17], data[17:]], [RESPONSE.size])
    s.queue.kick()
    second = s.queue.get_used()
    assert written == RESPONSE.size and RESPONSE.unpack(response)[0] == VIRTIO_MEM_RESP_ACK
    assert second[0][0] == head and RESPONSE.unpack(second[0][2])[0] == VIRTIO_MEM_RESP_ERROR  # already plugged


def test_indirect_chains_and_a_batch_in_one_kick(s: Setup) -> None:
    heads = [s.queue.add_buffer([MemRequest(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + i * BLOCK, 1).encode()],
                                [RESPONSE.size], indirect=bool(i % 2)) for i in range(6)]
    s.queue.kick()
    used = s.queue.get_used()
    assert [h for h, _, _ in used] == heads
    assert all(RESPONSE.unpack(d)[0] == VIRTIO_MEM_RESP_ACK for _, _, d in used)
    assert s.device.plugged_size == 6 * BLOCK


def test_padding_in_requests_is_ignored(s: Setup) -> None:
    raw = bytearray(MemRequest(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1).encode())
    raw[2:8] = b"\xff" * 6
    raw[18:24] = b"\xff" * 6
    written, response = s.send(bytes(raw))
    assert RESPONSE.unpack(response)[0] == VIRTIO_MEM_RESP_ACK


def test_malformed_chain_is_answered_empty_and_counted_not_raised(s: Setup) -> None:
    """The one malformed-chain policy of VirtioDevice.drain (issue 12): answered with 0 bytes, counted."""
    s.queue.write_desc(0, addr=0x1000, length=24, flags=VIRTQ_DESC_F_NEXT, next=0)  # a loop
    s.queue.publish(0)
    s.queue.kick()
    assert not s.broken and s.queue.used_idx() == 1
    assert s.device.counters["errors"] == 1
    assert isinstance(MemError("x"), VirtioDeviceError)


def test_broken_ring_marks_the_device_broken_not_the_vmm(s: Setup) -> None:
    s.queue.set_avail_idx(1000)  # far more than the queue size ahead: no head to answer
    s.queue.kick()
    assert s.broken


def test_writable_descriptor_outside_ram_is_refused_without_writing(s: Setup) -> None:
    request_addr = s.driver.allocator.alloc(24)
    s.memory.write(request_addr, MemRequest(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, 1).encode())
    s.queue.write_desc(0, addr=request_addr, length=24, flags=VIRTQ_DESC_F_NEXT, next=1)
    s.queue.write_desc(1, addr=2**64 - 4, length=10, flags=VIRTQ_DESC_F_WRITE)
    s.queue.publish(0)
    s.queue.kick()
    assert s.device.plugged_size == 0 and s.device.counters["errors"] == 1 and s.queue.used_idx() == 1


def test_notify_of_another_queue_is_ignored(s: Setup) -> None:
    s.device.notify(5)
    assert s.device.counters["plug_requests"] == 0


def test_guest_memory_is_separate() -> None:
    memory = GuestMemory()
    assert memory.regions == []


@pytest.mark.may_skip
@pytest.mark.skipif(not Path("/sys/kernel/mm/hugepages/hugepages-2048kB").is_dir(), reason="no 2 MiB hugetlbfs")
def test_on_hugetlbfs_a_plug_the_pool_cannot_back_is_busy_not_a_sigbus() -> None:
    """virtio-mem on hugetlbfs preallocates plugged blocks: beyond the host's free 2 MiB pages, BUSY."""
    from memvisor.memory.backend import MemoryBackend, hugepage_pool

    pool = hugepage_pool()
    assert pool is not None
    blocks = pool.available + 1  # one block more than the pool can give
    region = MemoryRegion.memfd(VMEM_GPA, -(-blocks * BLOCK // (128 * MIB)) * 128 * MIB, "vmem",
                                MemoryBackend("hugetlb"), reserve=False)  # fmt: skip
    s = Setup(requested=blocks * BLOCK, region=region, prealloc=True)
    assert s.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA, blocks)[0] == VIRTIO_MEM_RESP_BUSY
    assert s.device.plugged_size == 0 and region.allocated_bytes() == 0  # rolled back: nothing kept
    s.memory.close()
