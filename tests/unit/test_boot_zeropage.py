"""The zero page (struct boot_params): fields at their <asm/bootparam.h> offsets, setup header kept as it is.

The offsets memvisor uses are compared with the kernel's own header through gcc (skipped without it); the
page built from a synthetic bzImage is then decoded field by field at those offsets.
"""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from memvisor.boot import bzimage, e820, zeropage
from memvisor.boot.bzimage import parse_bzimage
from memvisor.boot.e820 import E820Entry, build_e820
from tests.unit.test_boot_bzimage import make_bzimage

BOOTPARAM_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/bootparam.h")

# memvisor constant -> the C expression for the same offset in struct boot_params.
ZEROPAGE_OFFSETS = {
    "ACPI_RSDP_ADDR": "offsetof(struct boot_params, acpi_rsdp_addr)",
    "EXT_RAMDISK_IMAGE": "offsetof(struct boot_params, ext_ramdisk_image)",
    "EXT_RAMDISK_SIZE": "offsetof(struct boot_params, ext_ramdisk_size)",
    "EXT_CMD_LINE_PTR": "offsetof(struct boot_params, ext_cmd_line_ptr)",
    "E820_ENTRIES": "offsetof(struct boot_params, e820_entries)",
    "E820_TABLE": "offsetof(struct boot_params, e820_table)",
    "TYPE_OF_LOADER": "offsetof(struct boot_params, hdr.type_of_loader)",
    "LOADFLAGS": "offsetof(struct boot_params, hdr.loadflags)",
    "RAMDISK_IMAGE": "offsetof(struct boot_params, hdr.ramdisk_image)",
    "RAMDISK_SIZE": "offsetof(struct boot_params, hdr.ramdisk_size)",
    "HEAP_END_PTR": "offsetof(struct boot_params, hdr.heap_end_ptr)",
    "CMD_LINE_PTR": "offsetof(struct boot_params, hdr.cmd_line_ptr)",
    "VID_MODE": "offsetof(struct boot_params, hdr.vid_mode)",
    "BOOT_PARAMS_SIZE": "sizeof(struct boot_params)",
}


@pytest.fixture(scope="module")
def bootparam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Offsets and sizes from <asm/bootparam.h>, keyed by a short name."""
    gcc = shutil.which("gcc")
    if gcc is None or not BOOTPARAM_HEADER.exists():
        pytest.skip("gcc or <asm/bootparam.h> is missing")
    expressions = dict(ZEROPAGE_OFFSETS)
    for name in bzimage._FIELDS:
        expressions[f"hdr.{name}"] = f"offsetof(struct boot_params, hdr.{name})"
        expressions[f"sizeof hdr.{name}"] = f"sizeof(((struct boot_params *)0)->hdr.{name})"
    expressions["hdr"] = "offsetof(struct boot_params, hdr)"
    expressions["sizeof e820 entry"] = "sizeof(struct boot_e820_entry)"
    expressions["e820 table entries"] = (
        "sizeof(((struct boot_params *)0)->e820_table) / sizeof(struct boot_e820_entry)"
    )
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <asm/bootparam.h>", "int main(void) {"]
    lines += [f'  printf("%s=%zu\\n", "{key}", (size_t)({expr}));' for key, expr in expressions.items()]
    lines += ["  return 0;", "}"]
    folder = tmp_path_factory.mktemp("bootparam")
    (folder / "probe.c").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [gcc, "-o", str(folder / "probe"), str(folder / "probe.c")], check=True, capture_output=True
    )
    output = subprocess.run([str(folder / "probe")], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split("=") for line in output.splitlines())}


def test_offsets_match_bootparam_h(bootparam: dict[str, int]) -> None:
    for name in ZEROPAGE_OFFSETS:
        assert getattr(zeropage, name) == bootparam[name], name
    assert bootparam["hdr"] == bzimage.SETUP_HEADER_OFFSET
    assert e820.E820_ENTRY.size == bootparam["sizeof e820 entry"]
    assert bootparam["e820 table entries"] == e820.E820_MAX_ENTRIES_ZEROPAGE


def test_bzimage_field_offsets_match_setup_header(bootparam: dict[str, int]) -> None:
    """The image file and the zero page share the setup header's offsets (boot.rst)."""
    for name, (offset, fmt) in bzimage._FIELDS.items():
        assert offset == bootparam[f"hdr.{name}"], name
        assert struct.calcsize(fmt) == bootparam[f"sizeof hdr.{name}"], name


def _zero_page(tmp_path: Path, **kwargs: int) -> tuple[bytes, bytes, list[E820Entry]]:
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage())
    image = parse_bzimage(path)
    table = build_e820(6 << 30)
    arguments = {
        "cmdline_addr": 0x20000,
        "initrd_addr": 0x3F000000,
        "initrd_size": 0x123456,
        "rsdp_addr": 0xE0000,
    }
    arguments.update(kwargs)
    page = zeropage.build_zero_page(image.setup_header, e820=table, **arguments)
    return page, image.setup_header, table


def _u(page: bytes, offset: int, fmt: str) -> int:
    value: int = struct.unpack_from(fmt, page, offset)[0]
    return value


def test_loader_fields(tmp_path: Path) -> None:
    page, _, _ = _zero_page(tmp_path)
    assert len(page) == 4096
    assert page[0x210] == 0xFF  # type_of_loader: undefined loader
    assert page[0x211] & 0x01  # LOADED_HIGH
    assert page[0x211] & 0x80  # CAN_USE_HEAP
    assert _u(page, 0x228, "<I") == 0x20000  # cmd_line_ptr
    assert _u(page, 0x0C8, "<I") == 0  # ext_cmd_line_ptr
    assert _u(page, 0x218, "<I") == 0x3F000000  # ramdisk_image
    assert _u(page, 0x21C, "<I") == 0x123456  # ramdisk_size
    assert _u(page, 0x0C0, "<I") == 0 and _u(page, 0x0C4, "<I") == 0
    assert _u(page, 0x070, "<Q") == 0xE0000  # acpi_rsdp_addr
    assert _u(page, 0x1FA, "<H") == 0xFFFF  # vid_mode: normal
    assert _u(page, 0x224, "<H") == 0xFE00  # heap_end_ptr


def test_addresses_above_4g_use_the_ext_fields(tmp_path: Path) -> None:
    page, _, _ = _zero_page(
        tmp_path, cmdline_addr=0x1_2345_6000, initrd_addr=0x2_0000_1000, initrd_size=0x1_0000_0010
    )
    assert _u(page, 0x228, "<I") == 0x2345_6000 and _u(page, 0x0C8, "<I") == 1
    assert _u(page, 0x218, "<I") == 0x1000 and _u(page, 0x0C0, "<I") == 2
    assert _u(page, 0x21C, "<I") == 0x10 and _u(page, 0x0C4, "<I") == 1


def test_e820_table_in_the_page(tmp_path: Path) -> None:
    page, _, table = _zero_page(tmp_path)
    assert page[0x1E8] == len(table)
    decoded = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(len(table))]
    assert decoded == [(entry.addr, entry.size, entry.type) for entry in table]
    assert page[0x2D0 + 20 * len(table) : 0x2D0 + 20 * 128] == bytes(20 * (128 - len(table)))


def test_setup_header_copied_unchanged_apart_from_loader_fields(tmp_path: Path) -> None:
    page, header, _ = _zero_page(tmp_path)
    written: set[int] = set()
    for offset, size in ((0x1FA, 2), (0x210, 1), (0x211, 1), (0x218, 4), (0x21C, 4), (0x224, 2), (0x228, 4)):
        written.update(range(offset, offset + size))
    for index, byte in enumerate(header):
        offset = 0x1F1 + index
        if offset not in written:
            assert page[offset] == byte, hex(offset)
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x211] & 0x7F == header[0x211 - 0x1F1] | 0x01  # the kernel's own loadflags bits are kept
    assert page[0x1F1 + len(header) : 0x2D0] == bytes(0x2D0 - 0x1F1 - len(header))  # nothing after it
    assert page[:0x70] == bytes(0x70)  # screen_info etc. stay zero


def test_too_many_e820_entries(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage())
    image = parse_bzimage(path)
    entries = [E820Entry(i << 20, 1 << 20, 1) for i in range(129)]
    with pytest.raises(ValueError, match="too many e820"):
        zeropage.build_zero_page(
            image.setup_header, cmdline_addr=0, initrd_addr=0, initrd_size=0, e820=entries, rsdp_addr=0
        )
    page = zeropage.build_zero_page(
        image.setup_header, cmdline_addr=0, initrd_addr=0, initrd_size=0, e820=entries[:128], rsdp_addr=0
    )
    assert page[0x1E8] == 128


def test_real_kernel_setup_header_is_kept() -> None:
    from tests.unit.test_boot_bzimage import real_kernel

    path = real_kernel()
    if path is None:
        pytest.skip("no Debian kernel in the image cache")
    image = parse_bzimage(path)
    page = zeropage.build_zero_page(
        image.setup_header, cmdline_addr=0x20000, initrd_addr=0, initrd_size=0, e820=build_e820(1 << 30), rsdp_addr=0xE0000
    )
    data = path.read_bytes()
    header_end = 0x202 + data[0x201]
    for name, (offset, fmt) in bzimage._FIELDS.items():
        if offset + struct.calcsize(fmt) <= header_end and name != "loadflags":
            assert struct.unpack_from(fmt, page, offset) == struct.unpack_from(fmt, data, offset), name
    assert page[0x211] == data[0x211] | 0x81
