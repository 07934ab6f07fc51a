"""A small ACPI Machine Language encoder: just what memvisor's DSDT needs (ACPI 6.4 chapter 20).

Each function returns the encoded bytes of one term; nest them the way ASL nests.
"""

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'


def pkg_length(body_length: int) -> bytes:
    """PkgLength (20.2.4) for a package whose contents after the PkgLength are `body_length` bytes."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra > 0 and total < (1 << (4 + 8 * extra)):
            first = (extra << 6) | (total & 0x0F)
            rest = [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes([first, *rest])
    raise ValueError("AML package too long")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with '_' (20.2.2)."""
    if not 1 <= len(name) <= 4 or not name.replace("_", "A").isalnum() or name[0].isdigit():
        raise ValueError(f"bad AML name segment {name!r}")
    return name.upper().ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional root prefix '\\' and dot-separated segments."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    segments = [name_seg(part) for part in path.split(".")] if path else []
    if len(segments) == 2:
        return prefix + b"\x2e" + b"".join(segments)  # DualNamePrefix
    if len(segments) > 2:
        return prefix + b"\x2f" + bytes([len(segments)]) + b"".join(segments)  # MultiNamePrefix
    return prefix + b"".join(segments)


def integer(value: int) -> bytes:
    """The shortest integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWord constants)."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 0 or value >= 1 << 64:
        raise ValueError("AML integers are unsigned 64-bit")
    for prefix, fmt, limit in (
        (BYTE_PREFIX, "<B", 1 << 8),
        (WORD_PREFIX, "<H", 1 << 16),
        (DWORD_PREFIX, "<I", 1 << 32),
    ):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def name(path: str, value: bytes) -> bytes:
    """Name(path, value)."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0501") as its compressed 32-bit integer (ACPI 6.4 19.6.35)."""
    if len(text) != 7:
        raise ValueError("an EISA id has 3 letters and 4 hex digits")
    letters = [ord(c) - 0x40 for c in text[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    value = (
        ((vendor >> 8) & 0xFF)
        | ((vendor & 0xFF) << 8)
        | (((product >> 8) & 0xFF) << 16)
        | ((product & 0xFF) << 24)
    )
    return integer(value)


# Resource descriptors (ACPI 6.4 section 6.4).
def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length): small descriptor 0x47."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 0x01, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags(){irq}: small descriptor 0x22 (edge, active high)."""
    return struct.pack("<BH", 0x22, 1 << irq)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite, base, length): large descriptor 0x86."""
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, length)


def extended_interrupt(gsi: int, *, edge: bool = True, active_low: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|Low, Exclusive){gsi}: large descriptor 0x89."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: the descriptors and an End Tag (0x79, checksum 0) in a Buffer."""
    return buffer(b"".join(descriptors) + b"\x79\x00")
