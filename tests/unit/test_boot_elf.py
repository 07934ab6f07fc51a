"""Direct boot of an uncompressed vmlinux: reading the ELF (boot/elf.py), compacting it (boot/vmlinux.py),
loading it into guest memory (vmm/loader.py), and the guest image keeping one beside its bzImage."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.boot import layout
from memvisor.boot.acpi.tables import build_acpi_tables
from memvisor.boot.elf import parse_elf_kernel
from memvisor.boot.vmlinux import compact_elf, write_direct_boot_kernel
from memvisor.errors import MemvisorError
from memvisor.lab.vmlinux import has_pvh_entry
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.vmm import loader
from memvisor.vmm.loader import read_kernel

MIB = 1 << 20
PT_LOAD, PT_NOTE, PT_GNU_STACK = 1, 4, 0x6474E551
TEXT = bytes(range(1, 256)) * 40  # no zero byte at its end
DATA = b"data" * 500 + bytes(3000)  # trailing zeros the compact file drops
SYMBOLS = 64 * 1024
NOTE = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)  # a PVH note, inside TEXT's segment


def make_vmlinux(*, entry: int = 0x1000000, machine: int = 62, elf_class: int = 2, text_paddr: int = 0x1000000,
                 bss: int = 8192) -> bytes:  # fmt: skip
    """An ELF64 laid out like a vmlinux: text (with a note in it), data with trailing zeros and .bss, a GNU_STACK."""
    text = TEXT + NOTE + TEXT
    text_off, data_off = 0x1000, 0x1000 + 0x4000
    body = bytearray(data_off + len(DATA) + SYMBOLS)  # + bytes no segment covers (symbols, in a real vmlinux)
    body[text_off : text_off + len(text)] = text
    body[data_off : data_off + len(DATA)] = DATA
    body[-SYMBOLS:] = b"S" * SYMBOLS
    phdrs = [
        (PT_LOAD, 5, text_off, 0xFFFFFFFF81000000, text_paddr, len(text), len(text), 0x200000),
        (PT_LOAD, 6, data_off, 0xFFFFFFFF82000000, 0x2000000, len(DATA), len(DATA) + bss, 0x200000),
        (PT_NOTE, 4, text_off + len(TEXT), 0xFFFFFFFF81000000 + len(TEXT), text_paddr + len(TEXT), len(NOTE),
         len(NOTE), 4),  # fmt: skip
        (PT_GNU_STACK, 6, 0, 0, 0, 0, 0, 16),
    ]
    header = bytearray(64)
    header[:7] = b"\x7fELF" + bytes([elf_class, 1, 1])
    struct.pack_into("<HHIQQQIHHH", header, 16, 2, machine, 1, entry, 64, 0x7000, 0, 64, 56, len(phdrs))
    struct.pack_into("<HHH", header, 58, 64, 30, 29)  # section headers a real vmlinux has (past the end here)
    for index, phdr in enumerate(phdrs):
        struct.pack_into("<IIQQQQQQ", body, 64 + index * 56, *phdr)
    body[:64] = header
    return bytes(body)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([MemoryRegion.memfd(0, 256 * MIB, "test-ram")]) as guest:
        yield guest


def test_a_vmlinux_is_read_segment_by_segment(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_vmlinux())
    kernel = read_kernel(path)  # chosen by the ELF magic
    assert kernel == parse_elf_kernel(path)
    assert kernel.entry_point == 0x1000000
    assert [(s.paddr, s.filesz, s.memsz) for s in kernel.segments] == [
        (0x1000000, 2 * len(TEXT) + len(NOTE), 2 * len(TEXT) + len(NOTE)),
        (0x2000000, len(DATA), len(DATA) + 8192),
    ]
    assert kernel.load_end == 0x2000000 + len(DATA) + 8192


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"elf_class": 1}, "not a 64-bit little-endian ELF"),
        ({"machine": 3}, "not an x86_64 executable"),
        ({"entry": 0x5000000}, "entry point 0x5000000 is in none of its loadable segments"),
        ({"text_paddr": 0x8000, "entry": 0x8000}, "loads below 1 MiB"),
    ],
)
def test_a_file_that_is_not_a_bootable_vmlinux_is_refused_by_name(tmp_path: Path, change: dict[str, int],
                                                                  message: str) -> None:  # fmt: skip
    path = tmp_path / "vmlinux"
    path.write_bytes(make_vmlinux(**change))
    with pytest.raises(MemvisorError, match=message):
        parse_elf_kernel(path)


def test_a_truncated_vmlinux_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_vmlinux()[:0x2000])
    with pytest.raises(MemvisorError, match="past the end of the file"):
        parse_elf_kernel(path)


def test_compacting_keeps_what_a_loader_reads_and_drops_the_rest(tmp_path: Path) -> None:
    original, compact = make_vmlinux(), compact_elf(make_vmlinux())
    assert len(compact) < len(original) - SYMBOLS + 8192  # the symbols went; only page alignment was added
    (tmp_path / "a").write_bytes(original)
    (tmp_path / "b").write_bytes(compact)
    before, after = parse_elf_kernel(tmp_path / "a"), parse_elf_kernel(tmp_path / "b")
    assert after.entry_point == before.entry_point
    assert [(s.paddr, s.memsz) for s in after.segments] == [(s.paddr, s.memsz) for s in before.segments]
    assert after.segments[1].filesz == len(DATA.rstrip(b"\0"))  # trailing zeros left to the loader
    for old, new in zip(before.segments, after.segments, strict=True):
        assert compact[new.offset : new.offset + new.filesz] == original[old.offset : old.offset + new.filesz]
    assert has_pvh_entry(compact)  # the note moved with its segment: QEMU can still boot the file as PVH
    assert struct.unpack_from("<Q", compact, 0x20)[0] == 64  # e_phoff: program headers right after the header
    assert struct.unpack_from("<Q", compact, 0x28)[0] == 0  # e_shoff: no section headers
    assert struct.unpack_from("<HH", compact, 60) == (0, 0)


def test_loading_puts_each_segment_at_its_address_and_zeroes_the_rest(tmp_path: Path, memory: GuestMemory) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(compact_elf(make_vmlinux()))
    kernel = parse_elf_kernel(path)
    memory.write(0x2000000, b"\xff" * (len(DATA) + 8192))  # left over from before a reboot: must not stay
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701" + b"i" * 10000)
    acpi = build_acpi_tables(1, [(0x3F8, 4)], [])
    loaded = loader.load_kernel(memory, kernel, initrd, "console=ttyS0", 256 * MIB, acpi)

    assert loaded.entry_point == 0x1000000  # startup_64 itself: no decompressor
    assert memory.read(0x1000000, len(TEXT)) == TEXT
    assert memory.read(0x2000000, len(DATA) + 8192) == DATA + bytes(8192)  # data, its zeros and .bss
    assert loaded.initrd_addr >= kernel.load_end
    zero_page = memory.read(layout.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<H", zero_page, 0x1FE)[0] == 0xAA55
    assert zero_page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zero_page, 0x206)[0] >= 0x020C
    assert zero_page[0x210] == 0xFF  # type_of_loader: undefined
    assert struct.unpack_from("<I", zero_page, 0x228)[0] == layout.CMDLINE_ADDR
    assert struct.unpack_from("<I", zero_page, 0x218)[0] == loaded.initrd_addr


def test_loading_into_fresh_memory_leaves_the_bss_to_the_host(tmp_path: Path, memory: GuestMemory) -> None:
    """Fresh guest RAM reads as zeros already: the .bss (23 MiB in Debian's kernel) costs the host no pages."""
    path = tmp_path / "vmlinux"
    path.write_bytes(compact_elf(make_vmlinux(bss=16 * MIB)))
    acpi = build_acpi_tables(1, [(0x3F8, 4)], [])
    loader.load_kernel(memory, parse_elf_kernel(path), None, "console=ttyS0", 256 * MIB, acpi)
    assert memory.allocated_bytes() < MIB  # text, data, boot tables: a few pages
    assert memory.read(0x2000000, len(DATA) + 16 * MIB) == DATA + bytes(16 * MIB)


def test_a_command_line_over_the_kernels_limit_is_refused(tmp_path: Path, memory: GuestMemory) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_vmlinux())
    acpi = build_acpi_tables(1, [(0x3F8, 4)], [])
    with pytest.raises(MemvisorError, match="command line is 2049 bytes"):
        loader.load_kernel(memory, parse_elf_kernel(path), None, "x" * 2048, 256 * MIB, acpi)


def test_the_direct_boot_file_is_made_from_a_bzimage(tmp_path: Path) -> None:
    bzimage = tmp_path / "vmlinuz"
    bzimage.write_bytes(b"MZ setup " * 100 + gzip.compress(make_vmlinux()) + b"tail")
    assert write_direct_boot_kernel(bzimage, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == compact_elf(make_vmlinux())
    assert not write_direct_boot_kernel(tmp_path / "vmlinux", tmp_path / "other")  # no payload inside
    assert not (tmp_path / "other").exists()


def test_the_real_debian_kernel_compacts_to_its_loaded_bytes(tmp_path: Path) -> None:
    from memvisor.guest.image import find_guest_image
    from memvisor.guest.packages import cache_dir

    image = find_guest_image("default")  # XZ-compressed (the cloud flavour's zstd kernel boots as a bzImage)
    cached = sorted((cache_dir() / "images").glob("guest-default-*/vmlinuz"))
    bzimage = image.kernel if image is not None else cached[0] if cached else None
    if bzimage is None:
        pytest.skip("no Debian kernel in the image cache")
    assert write_direct_boot_kernel(bzimage, tmp_path / "vmlinux")
    kernel = parse_elf_kernel(tmp_path / "vmlinux")
    assert kernel.entry_point == layout.KERNEL_LOAD_ADDR  # phys_startup_64 at the kernel's link address
    loaded = sum(segment.filesz for segment in kernel.segments)
    assert (tmp_path / "vmlinux").stat().st_size < loaded + 64 * 1024  # nothing but the loaded bytes, nearly
    assert has_pvh_entry((tmp_path / "vmlinux").read_bytes())


def test_an_image_made_before_the_vmlinux_existed_gets_one_and_boots_it(tmp_path: Path) -> None:
    import json

    from memvisor.guest import image as guest_image

    folder = tmp_path / "guest-default-key"
    folder.mkdir()
    (folder / "vmlinuz").write_bytes(b"MZ setup " * 100 + gzip.compress(make_vmlinux()))
    (folder / "initrd.img").write_bytes(b"070701")
    (folder / "image.json").write_text(json.dumps({"kernel_release": "6.1.0-x-amd64", "flavour": "default"}))
    old = guest_image._load_image(folder)
    assert old is not None and old.vmlinux is None and old.boot_kernel == folder / "vmlinuz"
    said: list[str] = []
    new = guest_image._with_vmlinux(old, said.append)
    assert new.vmlinux == folder / "vmlinux" and new.boot_kernel == folder / "vmlinux"
    assert guest_image._load_image(folder) == new  # found as it is from now on
    assert parse_elf_kernel(new.boot_kernel).entry_point == 0x1000000
    assert said and "direct boot" in said[0]


def test_a_kernel_compressed_another_way_keeps_booting_as_a_bzimage(tmp_path: Path) -> None:
    """Debian's cloud kernel is zstd-compressed: its payload (where the setup header says) is not unpacked."""
    header = bytearray(0x1000)
    header[0x1F1] = 1  # one setup sector: the protected-mode code starts at 0x400
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x206, 0x020F)
    zstd_payload = b"\x28\xb5\x2f\xfd" + gzip.compress(make_vmlinux())  # a gzip stream inside is not the payload
    struct.pack_into("<II", header, 0x248, 0x100, len(zstd_payload))
    bzimage = tmp_path / "vmlinuz"
    bzimage.write_bytes(bytes(header[:0x500]) + zstd_payload)
    assert not write_direct_boot_kernel(bzimage, tmp_path / "vmlinux")
