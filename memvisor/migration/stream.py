"""The live migration stream, version 1: what a memvisor source sends a memvisor destination.

Layout (all integers little-endian; the spec of this format is this docstring and docs/MIGRATION.md):

    stream header   8 bytes magic b"MVMIGRAT", u32 version (1), u32 flags (0)
    then records    u8 type, 3 bytes zero, u32 payload length, payload

    type  name     payload                                                       direction
    1     CONFIG   JSON {"memory", "vcpus", "numa_nodes", "devices", "regions":   source -> destination, first
                   [[name, gpa, size], ...], "page_size"}
    2     PLUGGED  JSON {"devices": [{"id": str, "state": MemState (codec)}]}:     before the RAM of each pass
                   virtio-mem plugged bitmaps, applied before any page lands
    3     PAGES    u64 gpa, u32 count, count * 4096 bytes of page data
    4     ZERO     u64 gpa, u32 count: the pages read as zeros (the destination
                   discards them)
    5     PASS     u32 pass number (a new dirty pass starts; informational)
    6     STATE    JSON MachineState (memvisor/vmm/snapshot.py, codec-checked)
    7     END      empty: the destination acknowledges, then runs the guest
    128   ACK      JSON {"ok": true} or {"error": "..."}                        destination -> source, after
                                                                                CONFIG and after END

The stream is untrusted input on the destination: every record is checked (type known, length within its
limit, sizes consistent, page ranges aligned and inside one migrated RAM region) and a failure raises
StreamError naming the record and field, never a crash or a write outside guest RAM.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from memvisor.errors import MemvisorError

MAGIC = b"MVMIGRAT"
VERSION = 1
PAGE_SIZE = 4096
STREAM_HEADER = struct.Struct("<8sII")
RECORD_HEADER = struct.Struct("<B3xI")
RANGE = struct.Struct("<QI")
PASS_NUMBER = struct.Struct("<I")

CONFIG, PLUGGED, PAGES, ZERO, PASS, STATE, END, ACK = 1, 2, 3, 4, 5, 6, 7, 128
NAMES = {CONFIG: "CONFIG", PLUGGED: "PLUGGED", PAGES: "PAGES", ZERO: "ZERO", PASS: "PASS", STATE: "STATE",
         END: "END", ACK: "ACK"}  # fmt: skip
MAX_PAGES_PER_RECORD = 256  # 1 MiB of data
MAX_ZERO_RUN = 1 << 30  # pages in one ZERO record
LIMITS = {
    CONFIG: 1 << 20,
    PLUGGED: 16 << 20,
    PAGES: RANGE.size + MAX_PAGES_PER_RECORD * PAGE_SIZE,
    ZERO: RANGE.size,
    PASS: PASS_NUMBER.size,
    STATE: 64 << 20,
    END: 0,
    ACK: 1 << 16,
}


class StreamError(MemvisorError):
    """The incoming migration stream is malformed, truncated, from another version or does not fit."""


class ByteStream(Protocol):
    def sendall(self, data: bytes | memoryview, /) -> None: ...

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...


@dataclass(frozen=True)
class Record:
    type: int
    payload: memoryview

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))


def stream_header() -> bytes:
    return STREAM_HEADER.pack(MAGIC, VERSION, 0)


def encode_record(kind: int, payload: bytes | memoryview = b"") -> bytes:
    if len(payload) > LIMITS[kind]:
        raise ValueError(f"a {NAMES[kind]} record of {len(payload)} bytes exceeds its {LIMITS[kind]}-byte limit")
    return RECORD_HEADER.pack(kind, len(payload)) + bytes(payload)


def json_record(kind: int, value: Any) -> bytes:
    return encode_record(kind, json.dumps(value, separators=(",", ":")).encode())


def pages_record(gpa: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    """A PAGES record as pieces for sendall (the page data is not copied)."""
    count = len(data) // PAGE_SIZE
    if not 1 <= count <= MAX_PAGES_PER_RECORD or len(data) % PAGE_SIZE:
        raise ValueError(f"a PAGES record holds 1 to {MAX_PAGES_PER_RECORD} whole pages, not {len(data)} bytes")
    return [RECORD_HEADER.pack(PAGES, RANGE.size + len(data)) + RANGE.pack(gpa, count), data]


def zero_record(gpa: int, count: int) -> bytes:
    return encode_record(ZERO, RANGE.pack(gpa, count))


def pass_record(number: int) -> bytes:
    return encode_record(PASS, PASS_NUMBER.pack(number))


def read_exact(stream: ByteStream, size: int, what: str) -> memoryview:
    buffer = memoryview(bytearray(size))
    done = 0
    while done < size:
        got = stream.recv_into(buffer[done:], size - done)
        if got == 0:
            raise StreamError(f"{what}: the stream ended after {done} of {size} bytes (the source went away)")
        done += got
    return buffer


def read_stream_header(stream: ByteStream) -> None:
    magic, version, flags = STREAM_HEADER.unpack(read_exact(stream, STREAM_HEADER.size, "stream header"))
    if magic != MAGIC:
        raise StreamError(f"stream header.magic: {bytes(magic)!r} is not a memvisor migration stream ({MAGIC!r})")
    if version != VERSION:
        raise StreamError(f"stream header.version: {version}, this memvisor reads version {VERSION}: "
                          "migrate between memvisor versions that share a stream version")  # fmt: skip
    if flags != 0:
        raise StreamError(f"stream header.flags: {flags:#x} holds unknown flags")


def read_record(stream: ByteStream, expected: tuple[int, ...] | None = None) -> Record:
    """The next record, its header checked (known type, length within the type's limit, an expected type)."""
    kind, length = RECORD_HEADER.unpack(read_exact(stream, RECORD_HEADER.size, "record header"))
    if kind not in LIMITS:
        raise StreamError(f"record.type: {kind} is not a known record type")
    name = NAMES[kind]
    if expected is not None and kind not in expected:
        wanted = " or ".join(NAMES[k] for k in expected)
        raise StreamError(f"record.type: a {name} record came where {wanted} was expected")
    if length > LIMITS[kind]:
        raise StreamError(f"{name}.length: {length} bytes exceeds the {LIMITS[kind]}-byte limit")
    return Record(kind, read_exact(stream, length, f"{name} record") if length else memoryview(b""))


def parse_json(record: Record) -> Any:
    try:
        value = json.loads(bytes(record.payload))
    except ValueError as error:
        raise StreamError(f"{record.name}: the payload is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise StreamError(f"{record.name}: the payload is not a JSON object")
    return value


def parse_range(record: Record) -> tuple[int, int, memoryview]:
    """(gpa, page count, page data) of a PAGES or ZERO record, sizes checked."""
    if len(record.payload) < RANGE.size:
        raise StreamError(f"{record.name}.length: {len(record.payload)} bytes, a range needs {RANGE.size}")
    gpa, count = RANGE.unpack_from(record.payload)
    data = record.payload[RANGE.size :]
    if gpa % PAGE_SIZE:
        raise StreamError(f"{record.name}.gpa: {gpa:#x} is not page-aligned")
    if record.type == PAGES:
        if not 1 <= count <= MAX_PAGES_PER_RECORD:
            raise StreamError(f"PAGES.count: {count} is not 1 to {MAX_PAGES_PER_RECORD}")
        if len(data) != count * PAGE_SIZE:
            raise StreamError(f"PAGES.length: {len(data)} data bytes for {count} pages")
    elif not 1 <= count <= MAX_ZERO_RUN:
        raise StreamError(f"ZERO.count: {count} is not 1 to {MAX_ZERO_RUN}")
    return gpa, count, data


def parse_pass(record: Record) -> int:
    if len(record.payload) != PASS_NUMBER.size:
        raise StreamError(f"PASS.length: {len(record.payload)} bytes, expected {PASS_NUMBER.size}")
    return int(PASS_NUMBER.unpack(record.payload)[0])
