"""virtio-mem state: save, restore, save again gives equal state in every state the driver can reach by
plugging and unplugging; a plugged bitmap that does not fit the region is refused naming the field."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.mem import VirtioMemDevice
from memvisor.devices.mem.protocol import VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_RESP_ACK
from memvisor.devices.mem.state import MemState, check_mem, restore_mem, save_mem
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot.codec import StateError, decode, encode
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.state import restore_transport, save_transport
from tests.unit.test_virtio_mem import BLOCK, MIB, REGION, VMEM_GPA, Setup


def _json(value: object) -> object:
    return json.loads(json.dumps(encode(value)))


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(1, 4)), max_size=10),
       requested=st.sampled_from([0, 64 * MIB, 200 * MIB]))  # fmt: skip
def test_mem_save_restore_save(ops: list[tuple[bool, int, int]], requested: int) -> None:
    setup = Setup(requested=requested)
    for plug, first, count in ops:
        setup.request(VIRTIO_MEM_REQ_PLUG if plug else VIRTIO_MEM_REQ_UNPLUG, VMEM_GPA + first * BLOCK, count)
    state = decode(MemState, _json(save_mem(setup.device)))
    transport_state = save_transport(setup.driver.transport)
    region = MemoryRegion.memfd(VMEM_GPA, REGION, "vmem2")
    try:
        fresh = VirtioMemDevice(region, block_size=BLOCK)
        transport = VirtioMmioTransport(fresh, setup.memory, lambda: None)
        check_mem(fresh, state, "mem")
        restore_mem(fresh, state)
        restore_transport(transport, transport_state, "transport")
        assert save_mem(fresh) == state
        assert save_transport(transport) == transport_state
        assert fresh.plugged_ranges() == setup.device.plugged_ranges()
        assert fresh.requested_size == setup.device.requested_size
    finally:
        region.close()
        setup.region.close()


def test_a_plugged_bitmap_of_the_wrong_length_is_refused() -> None:
    setup = Setup()
    assert setup.request(VIRTIO_MEM_REQ_PLUG)[0] == VIRTIO_MEM_RESP_ACK
    raw = _json(save_mem(setup.device))
    assert isinstance(raw, dict)
    raw["plugged"] = "AAAA"
    with pytest.raises(StateError, match=r"^state\.plugged: is 3 bytes, the region's 256 blocks need 32"):
        decode(MemState, raw)
    raw = _json(save_mem(setup.device))
    assert isinstance(raw, dict)
    raw["requested_size"] = REGION * 2
    with pytest.raises(StateError, match=r"^state\.requested_size"):
        decode(MemState, raw)
    setup.region.close()


def test_a_region_of_another_size_is_refused() -> None:
    setup = Setup()
    state = save_mem(setup.device)
    other = dataclasses.replace(state, region_size=REGION * 2, plugged=bytes(64))
    with pytest.raises(StateError, match=r"^mem\.region_size: .*give the same max-size"):
        check_mem(setup.device, other, "mem")
    setup.region.close()


def test_plugged_contents_round_trip_into_a_fresh_inaccessible_region(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Unplugged blocks are PROT_NONE on the host: saving never reads them (even with stray data in the
    backing), and a restore opens the plugged blocks before their contents are loaded into them."""
    import os

    from memvisor.snapshot import fileformat
    from memvisor.snapshot.fileformat import MemoryImage
    from memvisor.snapshot.memory import load_region, save_region

    setup = Setup(requested=REGION)
    assert setup.request(VIRTIO_MEM_REQ_PLUG, VMEM_GPA + 2 * BLOCK, 3)[0] == VIRTIO_MEM_RESP_ACK
    setup.region.view[2 * BLOCK : 2 * BLOCK + 5] = b"hello"
    setup.region.view[5 * BLOCK - 4096 : 5 * BLOCK] = b"z" * 4096
    os.pwrite(setup.region.fd, b"stray", 9 * BLOCK)  # data in an unplugged (inaccessible) block's backing
    layout = fileformat.layout_regions([("vmem", VMEM_GPA, REGION)])
    state_offset = fileformat.align_up(layout[-1][1] + REGION)
    path = tmp_path / "snap"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, state_offset)
        image = save_region(fd, setup.region, "vmem", *layout[0], lambda n: None)
        fileformat.write_header_and_state(fd, state_offset, {"x": 1}, MemoryImage((image,)))
    finally:
        os.close(fd)
    assert image.pages == 2  # the two written pages of plugged blocks; the stray page was never read
    state = decode(MemState, _json(save_mem(setup.device)))
    region = MemoryRegion.memfd(VMEM_GPA, REGION, "vmem2")
    try:
        fresh = VirtioMemDevice(region, block_size=BLOCK, requested_size=REGION)
        restore_mem(fresh, state)
        fd = os.open(path, os.O_RDONLY)
        try:
            _, loaded = fileformat.read_header_and_state(fd)
            load_region(fd, region, loaded.regions[0], "memory.regions[0]", lambda n: None)
        finally:
            os.close(fd)
        assert bytes(region.view[2 * BLOCK : 2 * BLOCK + 5]) == b"hello"
        assert bytes(region.view[5 * BLOCK - 4096 : 5 * BLOCK]) == b"z" * 4096
        assert fresh.plugged_ranges() == setup.device.plugged_ranges()
    finally:
        region.close()
        setup.region.close()


def test_the_block_bitmap_hands_out_a_copy_and_loads_only_its_own_length() -> None:
    import numpy as np

    from memvisor.devices.mem.blocks import BlockBitmap

    bitmap = BlockBitmap(8)
    bitmap.set_range(2, 3, True)
    copy = bitmap.to_array()
    copy[:] = False  # the caller's array, not the device's
    assert bitmap.plugged_count == 3
    with pytest.raises(ValueError, match="9 blocks given for a bitmap of 8"):
        bitmap.load(np.ones(9, dtype=bool))
    assert bitmap.plugged_count == 3
    bitmap.load(np.arange(8) % 2 == 0)
    assert list(bitmap.plugged_runs()) == [(0, 1), (2, 1), (4, 1), (6, 1)]
