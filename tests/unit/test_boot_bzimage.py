"""Parsing a bzImage (Documentation/x86/boot.rst): synthetic images, the real Debian kernel, and bad files.

`make_bzimage` builds the smallest file the parser accepts: real-mode setup sectors carrying a setup header,
then a recognisable protected-mode payload. test_boot_zeropage.py and test_boot_loader.py use it too.
"""

import os
import struct
from pathlib import Path

import pytest

from memvisor.boot import bzimage
from memvisor.errors import MemvisorError

HEADER_END = 0x268  # a 2.15 setup header ends after kernel_info_offset (0x264, 4 bytes)


def make_bzimage(
    *,
    setup_sects: int = 4,
    version: int = 0x020F,
    xloadflags: int = bzimage.XLF_KERNEL_64 | 0x2,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
    pref_address: int = 0x1000000,
    init_size: int = 0x200000,
    payload: bytes = b"KERNEL64" * 1024,
    boot_flag: int = bzimage.BOOT_FLAG,
    magic: bytes = bzimage.HEADER_MAGIC,
) -> bytes:
    """A synthetic bzImage: (setup_sects + 1) sectors of real-mode part with a setup header, then `payload`."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # 0 means 4, as in the parser
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB  # jmp short over the header
    setup[0x201] = HEADER_END - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH, as the kernel's own header says
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def write_bzimage(folder: Path, **fields: object) -> Path:
    path = folder / "vmlinuz"
    path.write_bytes(make_bzimage(**fields))  # type: ignore[arg-type]
    return path


def real_kernel() -> Path | None:
    """The Debian kernel from the image cache: the current image, else any cached one (the kernel is the same)."""
    from memvisor.guest.image import find_guest_image
    from memvisor.guest.packages import cache_dir

    image = find_guest_image()
    if image is not None:
        return image.kernel
    cached = sorted((cache_dir() / "images").glob("guest-*/vmlinuz"))
    return cached[0] if cached else None


def test_synthetic_image_fields(tmp_path: Path) -> None:
    payload = os.urandom(5000)
    path = write_bzimage(
        tmp_path, setup_sects=7, version=0x020F, initrd_addr_max=0x37FFFFFF, cmdline_size=4095,
        pref_address=0x2000000, init_size=0x1234000, payload=payload,
    )  # fmt: skip
    image = bzimage.parse_bzimage(path)
    assert image.path == path
    assert image.version == 0x020F
    assert image.initrd_addr_max == 0x37FFFFFF
    assert image.cmdline_size == 4095
    assert image.pref_address == 0x2000000
    assert image.init_size == 0x1234000
    data = path.read_bytes()
    assert image.kernel_offset == 8 * 512 and image.kernel_size == len(payload)  # after the (7 + 1) setup sectors
    assert data[image.kernel_offset :] == payload
    assert image.setup_header == data[0x1F1:HEADER_END]
    assert image.setup_header[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"


def test_setup_sects_zero_means_four(tmp_path: Path) -> None:
    """boot.rst: "If this field is 0, the real value is 4"."""
    payload = b"P" * 4096
    data = make_bzimage(setup_sects=0, payload=payload)
    assert data[0x1F1] == 0 and len(data) == 5 * 512 + len(payload)
    path = tmp_path / "vmlinuz"
    path.write_bytes(data)
    image = bzimage.parse_bzimage(path)
    assert (image.kernel_offset, image.kernel_size) == (5 * 512, len(payload))


def test_header_length_follows_the_jump_byte(tmp_path: Path) -> None:
    data = bytearray(make_bzimage())
    data[0x201] = 0x30  # an older, shorter header
    path = tmp_path / "vmlinuz"
    path.write_bytes(bytes(data))
    assert len(bzimage.parse_bzimage(path).setup_header) == 0x202 + 0x30 - 0x1F1


def test_real_debian_kernel() -> None:
    path = real_kernel()
    if path is None:
        pytest.skip("no Debian kernel in the image cache (memvisor image build)")
    image = bzimage.parse_bzimage(path)
    data = path.read_bytes()
    assert image.version >= 0x020F  # 6.1 speaks boot protocol 2.15
    assert image.pref_address == 0x1000000
    assert image.initrd_addr_max == 0x7FFFFFFF
    assert image.cmdline_size >= 2047
    assert image.init_size > image.kernel_size  # decompression needs room beyond the file
    setup_sects = data[0x1F1]
    assert image.kernel_offset == (setup_sects + 1) * 512 and image.kernel_size == len(data) - image.kernel_offset
    assert len(image.setup_header) == 0x202 + data[0x201] - 0x1F1
    assert image.setup_header.startswith(data[0x1F1:0x1F2])


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"boot_flag": 0x1234}, "not a Linux bzImage"),
        ({"magic": b"HdrX"}, "not a Linux bzImage"),
        ({"version": 0x020B}, "0x20b"),
        ({"xloadflags": 0x2}, "64-bit"),
    ],
)
def test_bad_images_are_named(tmp_path: Path, fields: dict[str, object], words: str) -> None:
    path = write_bzimage(tmp_path, **fields)
    with pytest.raises(MemvisorError) as caught:
        bzimage.parse_bzimage(path)
    message = str(caught.value)
    assert words in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MemvisorError, match=r"does not exist: give --kernel"):
        bzimage.parse_bzimage(tmp_path / "nope")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(MemvisorError, match=r"cannot read kernel"):
        bzimage.parse_bzimage(tmp_path)  # a directory: IsADirectoryError


@pytest.mark.parametrize("size", [0, 1, 0x200, 0x203, 0xFFF])
def test_too_short(tmp_path: Path, size: int) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage()[:size])
    with pytest.raises(MemvisorError, match="not a Linux bzImage"):
        bzimage.parse_bzimage(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(os.urandom(1 << 16))
    with pytest.raises(MemvisorError, match="not a Linux bzImage"):
        bzimage.parse_bzimage(path)


def test_truncated_after_the_setup_sectors(tmp_path: Path) -> None:
    data = make_bzimage(setup_sects=30, payload=b"")  # header promises 31 sectors, the file has exactly those
    path = tmp_path / "vmlinuz"
    path.write_bytes(data)
    with pytest.raises(MemvisorError, match="truncated"):
        bzimage.parse_bzimage(path)
    patched = bytearray(make_bzimage(setup_sects=4, payload=b"x" * 8192))
    patched[0x1F1] = 60  # now the setup part would end beyond the file
    path.write_bytes(bytes(patched))
    with pytest.raises(MemvisorError, match="truncated"):
        bzimage.parse_bzimage(path)
