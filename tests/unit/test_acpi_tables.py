"""The ACPI tables memvisor hands to Linux, decoded with the ACPI 6.4 layouts written out here.

RSDP 5.2.5.3, table header 5.2.6, XSDT 5.2.8, FADT 5.2.9 (table 5.9), MADT 5.2.12, GAS 5.2.3.2.
"""

import struct

import pytest

from memvisor.boot import layout
from memvisor.boot.acpi import tables
from memvisor.boot.acpi.tables import VirtioMmioSlot, build_acpi_tables

UARTS = [(layout.COM1_PORT, layout.COM1_GSI), (layout.COM2_PORT, layout.COM2_GSI)]


def _slots(count: int) -> list[VirtioMmioSlot]:
    return [VirtioMmioSlot(*layout.virtio_mmio_slot(index)) for index in range(count)]


def _memory(vcpus: int = 2, slots: int = 3) -> tuple[dict[int, bytes], int]:
    built = build_acpi_tables(vcpus, UARTS, _slots(slots))
    return built.blobs, built.rsdp_addr


def _at(blobs: dict[int, bytes], address: int) -> bytes:
    """The table that starts at `address` (as the guest would find it by following a pointer)."""
    assert address in blobs, f"nothing placed at {address:#x}"
    return blobs[address]


def _tables(blobs: dict[int, bytes]) -> dict[bytes, bytes]:
    return {blob[:4]: blob for blob in blobs.values() if blob[:8] != b"RSD PTR "}


def _gas(raw: bytes, offset: int) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("<BBBBQ", raw, offset)  # type: ignore[return-value]


@pytest.mark.parametrize(("vcpus", "slots"), [(1, 0), (2, 3), (8, 8)])
def test_every_table_checksum_and_length(vcpus: int, slots: int) -> None:
    blobs, _ = _memory(vcpus, slots)
    found = _tables(blobs)
    assert set(found) == {b"DSDT", b"FACP", b"APIC", b"XSDT"}
    for signature, raw in found.items():
        assert sum(raw) % 256 == 0, signature
        assert struct.unpack_from("<I", raw, 4)[0] == len(raw), signature
        header = tables.TABLE_HEADER.unpack_from(raw)
        assert header[4] == b"MEMVSR" and header[5] == b"MEMVISOR"


@pytest.mark.parametrize(("vcpus", "slots"), [(1, 0), (8, 8)])
def test_layout_in_guest_memory(vcpus: int, slots: int) -> None:
    blobs, rsdp = _memory(vcpus, slots)
    assert rsdp == layout.ACPI_TABLES_ADDR
    spans = sorted((address, address + len(blob)) for address, blob in blobs.items())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start
    assert all(address % 16 == 0 for address in blobs)
    assert spans[0][0] >= layout.ACPI_TABLES_ADDR and spans[-1][1] <= layout.ACPI_TABLES_END
    assert spans[0][0] >= layout.EBDA_START  # inside the e820 reserved area


def test_tables_that_do_not_fit_below_1m() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        build_acpi_tables(2, UARTS, _slots(8), base=layout.ACPI_TABLES_END - 0x100)


def test_rsdp() -> None:
    blobs, rsdp_addr = _memory()
    rsdp = _at(blobs, rsdp_addr)
    assert len(rsdp) == 36
    signature, _, oem, revision, rsdt, length, xsdt, _, reserved = struct.unpack("<8sB6sBIIQB3s", rsdp)
    assert signature == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0, "ACPI 1.0 checksum over the first 20 bytes"
    assert sum(rsdp) % 256 == 0, "extended checksum over the whole structure"
    assert revision == 2 and length == 36 and rsdt == 0 and reserved == b"\0\0\0"
    assert oem == b"MEMVSR"
    assert _at(blobs, xsdt)[:4] == b"XSDT"


def test_xsdt_points_at_fadt_and_madt() -> None:
    blobs, rsdp_addr = _memory()
    xsdt = _at(blobs, struct.unpack_from("<Q", _at(blobs, rsdp_addr), 24)[0])
    pointers = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert sorted(_at(blobs, pointer)[:4] for pointer in pointers) == [b"APIC", b"FACP"]


def _fadt(blobs: dict[int, bytes]) -> bytes:
    return _tables(blobs)[b"FACP"]


def test_fadt_flags_and_version() -> None:
    fadt = _fadt(_memory()[0])
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 4  # FADT 6.4
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 2) and boot_arch & (1 << 3), "no VGA, no MSI"
    assert not boot_arch & (1 << 1), "no 8042 claimed (the kernel must not depend on one)"
    assert fadt[268:276] == b"MEMVISOR"


def test_fadt_sleep_and_reset_registers_in_io_space() -> None:
    fadt = _fadt(_memory()[0])
    system_io, byte_access = 1, 1
    assert _gas(fadt, 244) == (system_io, 8, 0, byte_access, layout.ACPI_SLEEP_CONTROL_PORT)
    assert _gas(fadt, 256) == (system_io, 8, 0, byte_access, layout.ACPI_SLEEP_STATUS_PORT)
    assert _gas(fadt, 116) == (system_io, 8, 0, byte_access, layout.ACPI_RESET_PORT)
    assert fadt[128] == layout.ACPI_RESET_VALUE


def test_fadt_points_at_the_dsdt() -> None:
    blobs, _ = _memory()
    fadt = _fadt(blobs)
    x_dsdt = struct.unpack_from("<Q", fadt, 140)[0]
    assert _at(blobs, x_dsdt)[:4] == b"DSDT"
    assert struct.unpack_from("<I", fadt, 40)[0] in (0, x_dsdt)
    # Hardware-reduced: no PM1 blocks, no SCI, no FACS.
    assert struct.unpack_from("<I", fadt, 36)[0] == 0 and struct.unpack_from("<Q", fadt, 132)[0] == 0
    assert fadt[46:48] == b"\0\0" and fadt[56:88] == bytes(32)


def _madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        assert length >= 2 and offset + length <= len(madt)
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_madt(vcpus: int) -> None:
    madt = _tables(_memory(vcpus)[0])[b"APIC"]
    lapic_address, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_address == 0xFEE00000 and flags & 1  # PCAT_COMPAT: there are 8259s
    entries = _madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", raw) for kind, raw in entries if kind == 0]
    assert [(uid, apic_id) for _, _, uid, apic_id, _ in lapics] == [(i, i) for i in range(vcpus)]
    assert all(length == 8 and flags & 1 for _, length, _, _, flags in lapics), "enabled"
    ioapics = [struct.unpack("<BBBBII", raw) for kind, raw in entries if kind == 1]
    assert ioapics == [(1, 12, 0, 0, 0xFEC00000, 0)]
    overrides = [struct.unpack("<BBBBIH", raw) for kind, raw in entries if kind == 2]
    assert overrides == [(2, 10, 0, 0, 2, 0)]  # ISA bus, IRQ 0 -> GSI 2, conforming polarity and trigger
    assert {kind for kind, _ in entries} == {0, 1, 2}


def test_dsdt_header_and_s5_bytes() -> None:
    dsdt = _tables(_memory()[0])[b"DSDT"]
    assert dsdt[8] == 2  # revision 2: 64-bit integers
    body = dsdt[36:]
    # Name(\_S5_, Package(2){5, 0}): NameOp, "\\_S5_", PackageOp, PkgLength 5 (itself and 4 more bytes),
    # NumElements 2, BytePrefix 5, ZeroOp
    assert body.startswith(b"\x08\\_S5_\x12\x05\x02\x0a\x05\x00")


def test_checksum_helper() -> None:
    assert tables.checksum(b"") == 0
    assert tables.checksum(b"\x01") == 0xFF
    data = bytes(range(200))
    assert (sum(data) + tables.checksum(data)) % 256 == 0
