"""Putting a kernel, its initramfs, command line, boot tables and ACPI into guest memory."""

from dataclasses import dataclass
from pathlib import Path

from memvisor.boot import layout, pagetables
from memvisor.boot.acpi.tables import AcpiTables
from memvisor.boot.bzimage import BzImage
from memvisor.boot.e820 import build_e820
from memvisor.boot.zeropage import build_zero_page
from memvisor.errors import MemvisorError
from memvisor.memory.guest_memory import GuestMemory

ENTRY_64_OFFSET = 0x200


@dataclass(frozen=True)
class LoadedKernel:
    entry_point: int
    initrd_addr: int
    initrd_size: int


def initrd_address(image: BzImage, initrd_size: int, memory_size: int) -> int:
    """The highest page-aligned address for the initramfs below both low RAM's end and initrd_addr_max."""
    low_end = layout.ram_ranges(memory_size)[0][1]
    top = min(low_end, image.initrd_addr_max + 1)
    address = (top - initrd_size) & ~(layout.PAGE_SIZE - 1)
    kernel_end = layout.KERNEL_LOAD_ADDR + max(image.init_size, len(image.kernel))
    if address < kernel_end:
        raise MemvisorError(
            f"the initramfs ({initrd_size >> 20} MiB) does not fit in guest memory above the kernel: give more --memory"
        )
    return address


def load_kernel(
    memory: GuestMemory, image: BzImage, initrd: Path | None, cmdline: str, memory_size: int, acpi: AcpiTables
) -> LoadedKernel:
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > min(image.cmdline_size + 1, layout.CMDLINE_MAX):
        raise MemvisorError(
            f"the kernel command line is {len(encoded)} bytes, over the kernel's limit: shorten --append"
        )
    if (
        layout.KERNEL_LOAD_ADDR + max(image.init_size, len(image.kernel))
        > layout.ram_ranges(memory_size)[0][1]
    ):
        raise MemvisorError("the kernel does not fit in guest memory: give more --memory")
    memory.write(layout.KERNEL_LOAD_ADDR, image.kernel)
    initrd_addr = initrd_size = 0
    if initrd is not None:
        try:
            data = initrd.read_bytes()
        except OSError as error:
            raise MemvisorError(f"cannot read initramfs {initrd}: {error.strerror}") from None
        initrd_size = len(data)
        initrd_addr = initrd_address(image, initrd_size, memory_size)
        memory.write(initrd_addr, data)
    memory.write(layout.CMDLINE_ADDR, encoded)
    for address, blob in pagetables.build_page_tables().items():
        memory.write(address, blob)
    memory.write(layout.GDT_ADDR, pagetables.build_gdt())
    for address, blob in acpi.blobs.items():
        memory.write(address, blob)
    zero_page = build_zero_page(
        image,
        cmdline_addr=layout.CMDLINE_ADDR,
        initrd_addr=initrd_addr,
        initrd_size=initrd_size,
        e820=build_e820(memory_size),
        rsdp_addr=acpi.rsdp_addr,
    )
    memory.write(layout.ZERO_PAGE_ADDR, zero_page)
    return LoadedKernel(layout.KERNEL_LOAD_ADDR + ENTRY_64_OFFSET, initrd_addr, initrd_size)
