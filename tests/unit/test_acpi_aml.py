"""The AML encoder (memvisor.boot.acpi.aml) against ACPI 6.4 chapter 20 and the resource descriptors of 6.4.

PkgLength is decoded here by the spec's rule (20.2.4) rather than by mirroring the encoder.
"""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.boot.acpi import aml


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(PkgLength value, bytes it occupies): bits 7-6 of the lead byte count the bytes that follow."""
    lead = data[0]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 5-4 of a multi-byte lead byte are reserved (zero)"
    value = lead & 0x0F
    for index in range(follow):
        value |= data[1 + index] << (4 + 8 * index)
    return value, 1 + follow


@pytest.mark.parametrize(
    ("body", "size"),
    [(0, 1), (1, 1), (62, 1), (63, 2), (64, 2), (4093, 2), (4094, 3), (4095, 3), (4096, 3),
     ((1 << 20) - 4, 3), ((1 << 20) - 3, 4), ((1 << 28) - 5, 4)],
)  # fmt: skip
def test_pkg_length_boundaries(body: int, size: int) -> None:
    encoded = aml.pkg_length(body)
    assert len(encoded) == size
    value, used = decode_pkg_length(encoded)
    assert used == size
    assert value == body + size  # PkgLength counts itself and what follows it


def test_pkg_length_63_and_64_byte_packages() -> None:
    assert aml.pkg_length(62) == bytes([63])  # a 63-byte package fits the one-byte form
    assert aml.pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])  # 64 would not, 65 with the extra byte


def test_pkg_length_too_long() -> None:
    with pytest.raises(ValueError, match="too long"):
        aml.pkg_length((1 << 28) - 4)


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_pkg_length_round_trip(body: int) -> None:
    encoded = aml.pkg_length(body)
    value, used = decode_pkg_length(encoded)
    assert used == len(encoded) and value == body + used
    # The shortest form: one byte fewer could not hold the value.
    if used > 1:
        limit = 0x3F if used == 2 else (1 << (4 + 8 * (used - 2))) - 1
        assert body + used - 1 > limit


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e" + struct.pack("<Q", 1 << 32)),
        ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integer_encodings(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        aml.integer(value)


@pytest.mark.parametrize(
    ("name", "segment"),
    [("_HID", b"_HID"), ("COM1", b"COM1"), ("_SB", b"_SB_"), ("ab", b"AB__"), ("V000", b"V000")],
)
def test_name_seg(name: str, segment: bytes) -> None:
    assert aml.name_seg(name) == segment


@pytest.mark.parametrize("bad", ["", "FIVE5", "1ABC", "A-B", "A B", "É"])
def test_bad_name_seg(bad: str) -> None:
    with pytest.raises(ValueError):  # for "É", the ASCII encoding's own ValueError
        aml.name_seg(bad)


def test_name_strings() -> None:
    assert aml.name_string("_S5_") == b"_S5_"
    assert aml.name_string("\\_S5_") == b"\\_S5_"
    assert aml.name_string("\\_SB_.COM1") == b"\\\x2e_SB_COM1"  # DualNamePrefix
    assert aml.name_string("_SB_.PCI0.S08_") == b"\x2f\x03_SB_PCI0S08_"  # MultiNamePrefix, count 3


def test_eisa_id() -> None:
    assert aml.eisa_id("PNP0501") == aml.integer(0x0105D041)
    assert aml.eisa_id("PNP0A03") == aml.integer(0x030AD041)  # the PCI host bridge id every DSDT has
    assert aml.eisa_id("PNP0103") == aml.integer(0x0301D041)  # HPET
    with pytest.raises(ValueError):
        aml.eisa_id("PNP501")


def test_string() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"


def test_name_op() -> None:
    assert aml.name("_UID", aml.integer(2)) == b"\x08_UID\x0a\x02"


def _check_package_term(term: bytes, opcode: bytes) -> bytes:
    """Assert `term` is opcode + PkgLength + exactly the bytes the PkgLength covers; return those contents."""
    assert term.startswith(opcode)
    value, used = decode_pkg_length(term[len(opcode) :])
    assert len(opcode) + value == len(term)
    return term[len(opcode) + used :]


def test_package() -> None:
    term = aml.package(aml.integer(5), aml.integer(0))
    assert _check_package_term(term, b"\x12") == b"\x02\x0a\x05\x00"


def test_buffer() -> None:
    data = bytes(range(100))
    contents = _check_package_term(aml.buffer(data), b"\x11")
    assert contents == b"\x0a\x64" + data  # BufferSize, then the bytes


@pytest.mark.parametrize("terms", [1, 5, 300])  # 300 names push the PkgLength to three bytes
def test_device_and_scope_lengths(terms: int) -> None:
    body = [aml.name("_UID", aml.integer(index)) for index in range(terms)]
    device = aml.device("COM1", *body)
    assert _check_package_term(device, b"\x5b\x82") == b"COM1" + b"".join(body)
    scope = aml.scope("\\_SB_", device)
    assert _check_package_term(scope, b"\x10") == b"\\_SB_" + device


def test_io_port_descriptor() -> None:
    # Small resource, type 0x08 (I/O port), length 7: 0x47; decode16, min, max, alignment, length.
    assert aml.io_port(0x3F8, 8) == bytes([0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08])


@pytest.mark.parametrize("irq", [0, 3, 4, 15])
def test_irq_descriptor(irq: int) -> None:
    raw = aml.irq_no_flags(irq)
    assert raw[0] == 0x22  # small resource type 0x04 (IRQ), length 2
    assert struct.unpack_from("<H", raw, 1)[0] == 1 << irq


def test_memory32_fixed_descriptor() -> None:
    raw = aml.memory32_fixed(0xD0000000, 0x1000)
    kind, length, info, base, size = struct.unpack("<BHBII", raw)
    assert (kind, length, info, base, size) == (0x86, 9, 1, 0xD0000000, 0x1000)
    assert len(raw) == 3 + length
    assert aml.memory32_fixed(0, 1, writable=False)[3] == 0


@pytest.mark.parametrize(
    ("edge", "active_low", "flags"), [(True, False, 0x03), (False, False, 0x01), (False, True, 0x05)]
)
def test_extended_interrupt_descriptor(edge: bool, active_low: bool, flags: int) -> None:
    raw = aml.extended_interrupt(16, edge=edge, active_low=active_low)
    kind, length, got_flags, count, gsi = struct.unpack("<BHBBI", raw)
    assert (kind, length, count, gsi) == (0x89, 6, 1, 16)
    assert len(raw) == 3 + length
    assert got_flags == flags  # bit 0 consumer, bit 1 edge, bit 2 active low, bit 3 shared (no)


def test_resource_template_ends_with_end_tag() -> None:
    descriptors = aml.io_port(0x2F8, 8) + aml.irq_no_flags(3)
    contents = _check_package_term(aml.resource_template(aml.io_port(0x2F8, 8), aml.irq_no_flags(3)), b"\x11")
    size = len(descriptors) + 2
    assert contents == aml.integer(size) + descriptors + b"\x79\x00"
