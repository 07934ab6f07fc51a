"""Booting the lab kernel as a PVH ELF: finding the payload, the Xen PHYS32_ENTRY note, the cache."""

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from memvisor.lab.vmlinux import decompress_payload, has_pvh_entry, pvh_kernel


def make_elf(note_type: int = 18, note_name: bytes = b"Xen\x00") -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding one note."""
    desc = struct.pack("<I", 0x1000000)
    note = (
        struct.pack("<III", len(note_name), len(desc), note_type)
        + note_name.ljust(4 * ((len(note_name) + 3) // 4), b"\0")
        + desc
    )
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    phoff = 64
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    note_offset = phoff + 56
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note + b"\x90" * 100


def bzimage(payload: bytes, compress: str = "xz") -> bytes:
    packed = lzma.compress(payload, format=lzma.FORMAT_XZ) if compress == "xz" else gzip.compress(payload)
    return b"MZ setup code " * 50 + packed + b"trailing"


def test_pvh_note_is_found() -> None:
    assert has_pvh_entry(make_elf())
    assert not has_pvh_entry(make_elf(note_type=17))
    assert not has_pvh_entry(make_elf(note_name=b"Linux\x00"))
    assert not has_pvh_entry(b"not an elf" * 10)
    truncated = make_elf()[:80]
    assert not has_pvh_entry(truncated)


@pytest.mark.parametrize("compress", ["xz", "gzip"])
def test_payload_is_decompressed(compress: str) -> None:
    elf = make_elf()
    assert decompress_payload(bzimage(elf, compress)) == elf
    assert decompress_payload(b"no payload here") is None


def test_pvh_kernel_is_cached_by_content(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(make_elf()))
    cache = tmp_path / "cache"
    first = pvh_kernel(image, cache)
    assert first is not None and first.read_bytes() == make_elf()
    first.write_bytes(b"marker")  # a second call must use the cache, not decompress again
    assert pvh_kernel(image, cache) == first and first.read_bytes() == b"marker"
    # A new kernel replaces the old copy.
    image.write_bytes(bzimage(make_elf() + b"v2"))
    second = pvh_kernel(image, cache)
    assert second is not None and second != first and not first.exists()


def test_kernels_without_pvh_fall_back(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(make_elf(note_type=3)))
    assert pvh_kernel(image, tmp_path / "cache") is None
    assert pvh_kernel(tmp_path / "absent", tmp_path / "cache") is None
