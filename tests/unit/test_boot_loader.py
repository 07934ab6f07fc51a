"""Putting the kernel, initramfs, command line and boot tables into guest memory (memvisor.vmm.loader).

Guest memory here is a sparse memfd (memvisor.memory), so no KVM is needed; what lands where is read back.
"""

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.boot import layout, pagetables
from memvisor.boot.acpi.tables import VirtioMmioSlot, build_acpi_tables
from memvisor.boot.bzimage import BzImage, parse_bzimage
from memvisor.errors import MemvisorError
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.vmm import loader
from tests.unit.test_boot_bzimage import make_bzimage, real_kernel

MIB, GIB = 1 << 20, 1 << 30


def _image(tmp_path: Path, **fields: int | bytes) -> BzImage:
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage(**fields))  # type: ignore[arg-type]
    return parse_bzimage(path)


@pytest.mark.parametrize("memory", [128 * MIB, 256 * MIB, 1 * GIB, 3 * GIB, 4 * GIB, 16 * GIB])
@pytest.mark.parametrize("initrd_size", [1, 4096, 4097, 30 * MIB + 123])
def test_initrd_address(tmp_path: Path, memory: int, initrd_size: int) -> None:
    image = _image(tmp_path, initrd_addr_max=0x7FFFFFFF, init_size=0x2000000)
    address = loader.initrd_address(image, initrd_size, memory)
    low_end = min(memory, layout.MMIO_HOLE_START)
    assert address % 4096 == 0
    assert address + initrd_size <= low_end
    assert address + initrd_size <= image.initrd_addr_max + 1
    assert address >= layout.KERNEL_LOAD_ADDR + image.init_size
    # As high as it can go: one more page up would not fit.
    assert address + 4096 + initrd_size > min(low_end, image.initrd_addr_max + 1)


def test_initrd_respects_a_low_initrd_addr_max(tmp_path: Path) -> None:
    image = _image(tmp_path, initrd_addr_max=0x37FFFFFF)
    address = loader.initrd_address(image, 5 * MIB, 2 * GIB)
    assert address + 5 * MIB <= 0x38000000 < address + 5 * MIB + 4096


def test_initrd_above_a_large_payload(tmp_path: Path) -> None:
    """The kernel's end is the larger of init_size and the file's payload."""
    image = _image(tmp_path, init_size=0x1000, payload=b"k" * (3 * MIB))
    address = loader.initrd_address(image, 100 * MIB, 128 * MIB)
    assert address >= layout.KERNEL_LOAD_ADDR + 3 * MIB


@pytest.mark.parametrize(
    ("memory", "initrd_size"),
    [(128 * MIB, 100 * MIB), (256 * MIB, 300 * MIB), (40 * MIB, 1), (48 * MIB + 4096, 4097)],
)
def test_initrd_too_big_for_memory(tmp_path: Path, memory: int, initrd_size: int) -> None:
    image = _image(tmp_path, init_size=0x2000000)
    with pytest.raises(
        MemvisorError, match="does not fit in guest memory above the kernel: give more --memory"
    ):
        loader.initrd_address(image, initrd_size, memory)


def test_initrd_address_for_the_real_kernel(tmp_path: Path) -> None:
    path = real_kernel()
    if path is None:
        pytest.skip("no Debian kernel in the image cache")
    image = parse_bzimage(path)
    address = loader.initrd_address(image, 40 * MIB, 256 * MIB)
    assert layout.KERNEL_LOAD_ADDR + image.init_size <= address < 256 * MIB - 40 * MIB + 1


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([MemoryRegion.memfd(0, 256 * MIB, "test-ram")]) as guest:
        yield guest


def test_load_kernel_places_everything(tmp_path: Path, memory: GuestMemory) -> None:
    payload = bytes(range(256)) * 64
    image = _image(tmp_path, payload=payload, init_size=0x800000)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701" + b"i" * 10000)
    acpi = build_acpi_tables(2, [(0x3F8, 4)], [VirtioMmioSlot(0xD0000000, 16)])
    loaded = loader.load_kernel(memory, image, initrd, "console=ttyS0 quiet", 256 * MIB, acpi)

    assert loaded.entry_point == layout.KERNEL_LOAD_ADDR + 0x200  # startup_64
    assert memory.read(layout.KERNEL_LOAD_ADDR, len(payload)) == payload
    assert loaded.initrd_size == initrd.stat().st_size
    assert memory.read(loaded.initrd_addr, loaded.initrd_size) == initrd.read_bytes()
    assert memory.read(layout.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    for address, blob in pagetables.build_page_tables().items():
        assert memory.read(address, len(blob)) == blob
    assert memory.read(layout.GDT_ADDR, 32) == pagetables.build_gdt()
    for address, blob in acpi.blobs.items():
        assert memory.read(address, len(blob)) == blob
    zero_page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<I", zero_page, 0x228)[0] == layout.CMDLINE_ADDR
    assert struct.unpack_from("<I", zero_page, 0x218)[0] == loaded.initrd_addr
    assert struct.unpack_from("<I", zero_page, 0x21C)[0] == loaded.initrd_size
    assert struct.unpack_from("<Q", zero_page, 0x70)[0] == acpi.rsdp_addr
    assert zero_page[0x1E8] == 3  # low RAM, reserved, RAM above 1 MiB


def test_load_kernel_without_initrd(tmp_path: Path, memory: GuestMemory) -> None:
    image = _image(tmp_path)
    acpi = build_acpi_tables(1, [], [])
    loaded = loader.load_kernel(memory, image, None, "", 256 * MIB, acpi)
    assert (loaded.initrd_addr, loaded.initrd_size) == (0, 0)
    zero_page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<II", zero_page, 0x218) == (0, 0)


def test_command_line_over_the_kernel_limit(tmp_path: Path, memory: GuestMemory) -> None:
    image = _image(tmp_path, cmdline_size=255)
    acpi = build_acpi_tables(1, [], [])
    loader.load_kernel(memory, image, None, "x" * 255, 256 * MIB, acpi)  # 255 bytes and the NUL fit
    with pytest.raises(MemvisorError, match="over the kernel's limit: shorten --append"):
        loader.load_kernel(memory, image, None, "x" * 256, 256 * MIB, acpi)


def test_kernel_larger_than_memory(tmp_path: Path, memory: GuestMemory) -> None:
    image = _image(tmp_path, init_size=250 * MIB)
    with pytest.raises(MemvisorError, match="does not fit in guest memory: give more --memory"):
        loader.load_kernel(memory, image, None, "", 256 * MIB, build_acpi_tables(1, [], []))


def test_unreadable_initrd(tmp_path: Path, memory: GuestMemory) -> None:
    image = _image(tmp_path)
    with pytest.raises(MemvisorError, match="cannot read initramfs"):
        loader.load_kernel(
            memory, image, tmp_path / "missing.img", "", 256 * MIB, build_acpi_tables(1, [], [])
        )


def test_an_initrd_from_a_pipe_is_read_to_its_end(tmp_path: Path, memory: GuestMemory) -> None:
    """Not a regular file (bash's <(...)): no size to read up to, so it is read to its end, as before."""
    data = b"070701" + os.urandom(200_000)
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)))
    writer.start()
    try:
        loaded = loader.load_kernel(memory, _image(tmp_path), Path(f"/dev/fd/{read_end}"), "", 256 * MIB,
                                    build_acpi_tables(1, [], []))  # fmt: skip
    finally:
        writer.join()
        os.close(read_end)
    assert loaded.initrd_size == len(data)
    assert memory.read(loaded.initrd_addr, len(data)) == data


def test_an_initrd_that_is_a_directory(tmp_path: Path, memory: GuestMemory) -> None:
    with pytest.raises(MemvisorError, match="cannot read initramfs .*: Is a directory"):
        loader.load_kernel(memory, _image(tmp_path), tmp_path, "", 256 * MIB, build_acpi_tables(1, [], []))


def test_a_kernel_cut_short_after_it_was_parsed(tmp_path: Path, memory: GuestMemory) -> None:
    image = _image(tmp_path, payload=b"k" * 100_000)
    with image.path.open("r+b") as file:  # cut while memvisor starts (a download still being written, say)
        file.truncate(image.kernel_offset + 5000)
    with pytest.raises(MemvisorError, match="ended early while loading it: download it again"):
        loader.load_kernel(memory, image, None, "", 256 * MIB, build_acpi_tables(1, [], []))


def test_the_loader_reports_every_byte_it_writes_to_the_dirty_hook(tmp_path: Path) -> None:
    """A reload (a guest reboot during a migration) must mark what it wrote dirty: preadv bypasses memory.write."""
    import random


    region = MemoryRegion.memfd(0, 4 << 20, "ram0")
    memory = GuestMemory([region])
    seen: list[tuple[int, int]] = []
    memory.on_write = lambda gpa, length: seen.append((gpa, length))
    blob = tmp_path / "blob"
    blob.write_bytes(random.Random(1).randbytes(3 * 4096 + 5))
    fd = os.open(blob, os.O_RDONLY)
    try:
        assert loader._read_into(memory, fd, 0x10000, 5, 3 * 4096)
    finally:
        os.close(fd)
    assert seen == [(0x10000, 3 * 4096)]
    assert bytes(memory.view(0x10000, 3 * 4096)) == blob.read_bytes()[5:]
