"""Reading a Linux bzImage: its setup header and the protected-mode kernel (Documentation/x86/boot.rst).

Offsets below are into the image file, which starts with the real-mode setup sectors; the setup header at
0x1f1 is copied into the zero page as it is, then the loader fields are filled in (see zeropage.py).
"""

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from memvisor.boot.layout import KERNEL_LOAD_ADDR
from memvisor.boot.zeropage import SETUP_HEADER_OFFSET
from memvisor.errors import MemvisorError

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags and 64-bit entry
XLF_KERNEL_64 = 1 << 0
ENTRY_64_OFFSET = 0x200
HEAD_SIZE = 0x1000  # the setup header and every field read lie in the first 4 KiB (a bzImage is far larger)

# (name, offset in the image, struct format): the setup header fields memvisor reads.
_FIELDS = {
    "setup_sects": (0x1F1, "<B"),
    "boot_flag": (0x1FE, "<H"),
    "header": (0x202, "4s"),
    "version": (0x206, "<H"),
    "loadflags": (0x211, "<B"),
    "initrd_addr_max": (0x22C, "<I"),
    "kernel_alignment": (0x230, "<I"),
    "xloadflags": (0x236, "<H"),
    "cmdline_size": (0x238, "<I"),
    "pref_address": (0x258, "<Q"),
    "init_size": (0x260, "<I"),
}


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: the raw setup header bytes and where the 64-bit kernel to load is in the file."""

    path: Path
    setup_header: bytes  # image[0x1f1 : 0x202 + image[0x201]]
    kernel_offset: int  # the protected-mode part, image[kernel_offset:], loaded at pref_address
    kernel_size: int  # (read by the loader straight into guest memory)
    version: int
    initrd_addr_max: int
    cmdline_size: int
    pref_address: int
    init_size: int

    @property
    def load_end(self) -> int:
        """One past the last byte the kernel needs while it decompresses itself (init_size from its load address)."""
        return KERNEL_LOAD_ADDR + max(self.init_size, self.kernel_size)

    @property
    def entry_point(self) -> int:
        """The 64-bit entry: 0x200 into the protected-mode kernel (boot.rst, "64-bit BOOT PROTOCOL")."""
        return KERNEL_LOAD_ADDR + ENTRY_64_OFFSET


def _field(data: bytes, name: str) -> int | bytes:
    offset, fmt = _FIELDS[name]
    value: int | bytes = struct.unpack_from(fmt, data, offset)[0]
    return value


def parse_bzimage(path: Path) -> BzImage:
    """Parse `path` as a 64-bit bootable bzImage, or raise MemvisorError naming what is wrong. Only the setup
    sectors' start is read here: the loader reads the kernel itself straight into guest memory."""
    try:
        with open(path, "rb") as file:
            data = file.read(HEAD_SIZE)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        raise MemvisorError(
            f"kernel {path} does not exist: give --kernel a bzImage, or omit it to use the built image"
        ) from None
    except OSError as error:
        raise MemvisorError(f"cannot read kernel {path}: {error.strerror}") from None
    if len(data) < HEAD_SIZE or _field(data, "boot_flag") != BOOT_FLAG or _field(data, "header") != HEADER_MAGIC:
        raise MemvisorError(f"kernel {path} is not a Linux bzImage (no boot signature): give a vmlinuz file")
    version = int(_field(data, "version"))  # type: ignore[arg-type]
    if version < MIN_BOOT_PROTOCOL or not int(_field(data, "xloadflags")) & XLF_KERNEL_64:  # type: ignore[arg-type]
        raise MemvisorError(
            f"kernel {path} cannot be booted in 64-bit mode (boot protocol {version:#x}): use a newer x86_64 kernel"
        )
    setup_sects = int(_field(data, "setup_sects")) or 4  # type: ignore[arg-type]
    kernel_offset = (setup_sects + 1) * 512
    header_end = 0x202 + data[0x201]
    if kernel_offset >= size:
        raise MemvisorError(f"kernel {path} is truncated: download it again")
    return BzImage(
        path=path,
        setup_header=data[SETUP_HEADER_OFFSET:header_end],
        kernel_offset=kernel_offset,
        kernel_size=size - kernel_offset,
        version=version,
        initrd_addr_max=int(_field(data, "initrd_addr_max")),  # type: ignore[arg-type]
        cmdline_size=int(_field(data, "cmdline_size")),  # type: ignore[arg-type]
        pref_address=int(_field(data, "pref_address")),  # type: ignore[arg-type]
        init_size=int(_field(data, "init_size")),  # type: ignore[arg-type]
    )
