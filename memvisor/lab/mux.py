"""The lab's wire protocol: many byte streams multiplexed over one virtio-serial port.

The host runner and the agent inside the lab (`inner.py`) share exactly one virtio-serial port (a virtio
console port can be opened once, and its host chardev carries one connection). Everything travels over it as
frames:

    +-----------+--------+-------------+------------------+
    | channel   | kind   | length      | payload          |
    | u32 BE    | u8     | u32 BE      | `length` bytes   |
    +-----------+--------+-------------+------------------+

Channel 0 carries control messages (START, READY, SIGNAL, EXIT, ERROR, LISTENING, HEARTBEAT, DIAGNOSE,
DIAGNOSIS); channels 1-3 are the
command's stdin, stdout and stderr; each client connection to a forwarded socket gets its own channel,
numbered by the host from FIRST_CONNECTION up.

A conversation:

    host  -> START(0, json request)           inner -> READY(0, "")       (inner sends READY as it starts)
    host  -> DATA(1, ...) / EOF(1)                     inner -> DATA(2|3, ...), EOF(2|3)
    inner -> LISTENING(0, forward index)               once the command has created the forwarded socket
    host  -> OPEN(ch, forward index)                   a host client connected; inner connects inside
    both  -> DATA(ch), EOF(ch) (half close), CLOSE(ch) (abort)
    host  -> SIGNAL(0, signo)                          inner signals the command's process group
    inner -> EXIT(0, status)                           the command ended; the host stops the lab
    inner -> HEARTBEAT(0, uptime text)                 every few seconds from READY on: the lab is alive
    host  -> DIAGNOSE(0, "")                           the lab looks stuck: collect what explains it
    inner -> DIAGNOSIS(0, text)                        the answer (see diagnose.py), at most MAX_PAYLOAD
"""

from __future__ import annotations

import enum
import json
import struct

from memvisor.errors import MemvisorError

# Frame header: channel (u32), kind (u8), payload length (u32), network byte order. Our own format.
HEADER = struct.Struct("!IBI")
# Small integer payloads (signal number, exit status, forward index).
INT_PAYLOAD = struct.Struct("!i")

# Larger payloads are split by the sender; a bigger length means the stream is corrupt.
MAX_PAYLOAD = 1 << 20

CONTROL = 0
STDIN = 1
STDOUT = 2
STDERR = 3
FIRST_CONNECTION = 16

# The virtio-serial port's name, as QEMU's `-device virtserialport,name=` sets it and L1 sees it in
# /sys/class/virtio-ports/*/name.
PORT_NAME = "memvisor.lab"


class Kind(enum.IntEnum):
    """What a frame means; see the module docstring for who sends which."""

    START = 1
    READY = 2
    DATA = 3
    EOF = 4
    OPEN = 5
    CLOSE = 6
    LISTENING = 7
    SIGNAL = 8
    EXIT = 9
    ERROR = 10
    HEARTBEAT = 11
    DIAGNOSE = 12
    DIAGNOSIS = 13


class MuxError(MemvisorError):
    """The byte stream between the host and the lab is not a valid frame sequence."""


class Frame:
    """One frame. (A plain class: dataclasses would import inspect, many file reads over 9p in the lab.)"""

    __slots__ = ("channel", "kind", "payload")

    def __init__(self, channel: int, kind: Kind, payload: bytes = b"") -> None:
        self.channel = channel
        self.kind = kind
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.channel, self.kind, self.payload) == (
            other.channel,
            other.kind,
            other.payload,
        )

    def __hash__(self) -> int:
        return hash((self.channel, self.kind, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.channel}, {self.kind.name}, {self.payload[:40]!r})"

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"frame payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        return HEADER.pack(self.channel, self.kind, len(self.payload)) + self.payload

    def integer(self) -> int:
        """The payload read as one signed 32-bit integer (SIGNAL, EXIT, LISTENING, OPEN)."""
        if len(self.payload) != INT_PAYLOAD.size:
            raise MuxError(
                f"{self.kind.name} frame needs a {INT_PAYLOAD.size}-byte payload, got {len(self.payload)}"
            )
        return int(INT_PAYLOAD.unpack(self.payload)[0])


def int_frame(channel: int, kind: Kind, value: int) -> Frame:
    return Frame(channel, kind, INT_PAYLOAD.pack(value))


def data_frames(channel: int, data: bytes) -> list[Frame]:
    """DATA frames carrying `data`, split so that no payload exceeds MAX_PAYLOAD."""
    return [Frame(channel, Kind.DATA, data[i : i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD)]


class FrameDecoder:
    """Turns a byte stream back into frames, whatever the chunking of the reads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Append `data` and return every frame now complete; raise MuxError on a corrupt stream."""
        self._buffer += data
        frames: list[Frame] = []
        offset = 0
        while len(self._buffer) - offset >= HEADER.size:
            channel, kind, length = HEADER.unpack_from(self._buffer, offset)
            if length > MAX_PAYLOAD:
                raise MuxError(f"frame of {length} bytes on channel {channel}: the lab link is corrupt")
            try:
                frame_kind = Kind(kind)
            except ValueError:
                raise MuxError(
                    f"unknown frame kind {kind} on channel {channel}: the lab link is corrupt"
                ) from None
            end = offset + HEADER.size + length
            if end > len(self._buffer):
                break
            frames.append(Frame(channel, frame_kind, bytes(self._buffer[offset + HEADER.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)


class StartRequest:
    """What to run in the lab: the START frame's payload (JSON).

    `shares` are (mount tag, path) pairs: a read-write 9p share to mount over `path` inside the lab.
    `forwards` are UNIX socket paths the command creates; the index in this list is the forward index that
    LISTENING and OPEN carry.
    """

    def __init__(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        shares: list[tuple[str, str]] | None = None,
        forwards: list[str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.shares = shares or []
        self.forwards = forwards or []
        self.stdin = stdin

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StartRequest) and self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]

    def encode(self) -> bytes:
        return json.dumps(
            {
                "argv": self.argv,
                "cwd": self.cwd,
                "env": self.env,
                "shares": [list(share) for share in self.shares],
                "forwards": self.forwards,
                "stdin": self.stdin,
            }
        ).encode()

    @classmethod
    def decode(cls, payload: bytes) -> StartRequest:
        try:
            raw = json.loads(payload)
            request = cls(
                argv=[str(arg) for arg in raw["argv"]],
                cwd=str(raw["cwd"]),
                env={str(key): str(value) for key, value in raw["env"].items()},
                shares=[(str(tag), str(path)) for tag, path in raw["shares"]],
                forwards=[str(path) for path in raw["forwards"]],
                stdin=bool(raw["stdin"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise MuxError(f"malformed START request: {error}") from None
        if not request.argv:
            raise MuxError("START request with an empty command")
        return request
