"""Putting a kernel, its initramfs, command line, boot tables and ACPI into guest memory.

Two kinds of kernel: a bzImage (its protected-mode part at 16 MiB, entered at its 64-bit entry, which
decompresses the kernel) and an uncompressed ELF vmlinux (each loadable segment at its physical address,
entered at the ELF entry: boot/elf.py). Everything else, the zero page included, is the same for both.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from memvisor.boot import layout, pagetables
from memvisor.boot.acpi.tables import AcpiTables
from memvisor.boot.e820 import build_e820
from memvisor.boot.elf import ElfKernel, is_elf, parse_elf_kernel
from memvisor.boot.zeropage import build_zero_page
from memvisor.errors import MemvisorError
from memvisor.memory.guest_memory import GuestMemory

# The bzImage parser only for a bzImage: the built image boots its vmlinux, and each module imported is start-up
# time of every boot in the lab (BENCHMARKS.md).
if TYPE_CHECKING:
    from memvisor.boot.bzimage import BzImage

KernelImage: TypeAlias = "BzImage | ElfKernel"


def read_kernel(path: Path) -> KernelImage:
    """The kernel at `path`, a vmlinux (ELF) or a bzImage, parsed; MemvisorError naming what is wrong."""
    if is_elf(path):
        return parse_elf_kernel(path)
    from memvisor.boot.bzimage import parse_bzimage

    return parse_bzimage(path)


@dataclass(frozen=True)
class LoadedKernel:
    entry_point: int
    initrd_addr: int
    initrd_size: int


def initrd_address(image: KernelImage, initrd_size: int, memory_size: int) -> int:
    """The highest page-aligned address for the initramfs below both low RAM's end and initrd_addr_max."""
    low_end = layout.ram_ranges(memory_size)[0][1]
    top = min(low_end, image.initrd_addr_max + 1)
    address = (top - initrd_size) & ~(layout.PAGE_SIZE - 1)
    if address < image.load_end:
        raise MemvisorError(
            f"the initramfs ({initrd_size >> 20} MiB) does not fit in guest memory above the kernel: give more --memory"
        )
    return address


def load_kernel(
    memory: GuestMemory, image: KernelImage, initrd: Path | None, cmdline: str, memory_size: int, acpi: AcpiTables
) -> LoadedKernel:
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > min(image.cmdline_size + 1, layout.CMDLINE_MAX):
        raise MemvisorError(
            f"the kernel command line is {len(encoded)} bytes, over the kernel's limit: shorten --append"
        )
    if image.load_end > layout.ram_ranges(memory_size)[0][1]:
        raise MemvisorError("the kernel does not fit in guest memory: give more --memory")
    if isinstance(image, ElfKernel):
        _load_segments(memory, image)
    else:
        _load_bzimage(memory, image)
    initrd_addr = initrd_size = 0
    if initrd is not None:
        initrd_addr, initrd_size = _load_initrd(memory, image, initrd, memory_size)
    memory.write(layout.CMDLINE_ADDR, encoded)
    for address, blob in pagetables.build_page_tables().items():
        memory.write(address, blob)
    memory.write(layout.GDT_ADDR, pagetables.build_gdt())
    for address, blob in acpi.blobs.items():
        memory.write(address, blob)
    zero_page = build_zero_page(
        image.setup_header,
        cmdline_addr=layout.CMDLINE_ADDR,
        initrd_addr=initrd_addr,
        initrd_size=initrd_size,
        e820=build_e820(memory_size),
        rsdp_addr=acpi.rsdp_addr,
    )
    memory.write(layout.ZERO_PAGE_ADDR, zero_page)
    return LoadedKernel(image.entry_point, initrd_addr, initrd_size)


def _read_into(memory: GuestMemory, fd: int, gpa: int, offset: int, length: int) -> bool:
    """Read `length` bytes at `offset` of `fd` straight into guest memory at `gpa`, with no copy through Python
    (the kernel and initramfs are tens of MiB); False if the file ends first."""
    done = 0
    while done < length:
        got = os.preadv(fd, [memory.view(gpa + done, length - done)], offset + done)
        if got <= 0:
            return False
        done += got
    hook = memory.on_write  # the VMM's own writes count as dirty (a reboot's reload during a migration)
    if hook is not None:
        hook(gpa, length)
    return True


@contextmanager
def _open_for_loading(path: Path, what: str) -> Iterator[int]:
    """`path` opened read-only for loading; an OSError while opening or reading it becomes a MemvisorError that
    names `what` the file is ("kernel", "initramfs") and why."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise MemvisorError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        yield fd
    except OSError as error:
        raise MemvisorError(f"cannot read {what} {path}: {error.strerror}") from None
    finally:
        os.close(fd)


def _load_initrd(memory: GuestMemory, image: KernelImage, initrd: Path, memory_size: int) -> tuple[int, int]:
    """Put the initramfs at its address (initrd_address); (address, size). A regular file is read straight into
    guest memory; anything else (a pipe such as bash's <(...)) is read to its end first."""
    with _open_for_loading(initrd, "initramfs") as fd:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            with os.fdopen(os.dup(fd), "rb") as stream:
                data = stream.read()
            address = initrd_address(image, len(data), memory_size)
            memory.write(address, data)
            return address, len(data)
        address = initrd_address(image, status.st_size, memory_size)
        if not _read_into(memory, fd, address, 0, status.st_size):
            raise MemvisorError(f"initramfs {initrd} ended early while loading it (was it being written?): run again once it is complete")
        return address, status.st_size


def _load_bzimage(memory: GuestMemory, image: BzImage) -> None:
    """Read the protected-mode kernel from the file straight into guest memory at its load address."""
    with _open_for_loading(image.path, "kernel") as fd:
        if not _read_into(memory, fd, layout.KERNEL_LOAD_ADDR, image.kernel_offset, image.kernel_size):
            raise MemvisorError(f"kernel {image.path} ended early while loading it: download it again")


def _load_segments(memory: GuestMemory, image: ElfKernel) -> None:
    """Read each segment from the file straight into guest memory, zero the rest."""
    with _open_for_loading(image.path, "kernel") as fd:
        for segment in image.segments:
            if not _read_into(memory, fd, segment.paddr, segment.offset, segment.filesz):
                raise MemvisorError(f"kernel {image.path} ended early while loading it: download it again")
            memory.zero(segment.paddr + segment.filesz, segment.memsz - segment.filesz)
