"""Splitting a QMP byte stream into JSON values, as QEMU's json-streamer does.

QMP is not line-based: clients may send `{"execute":"stop"}{"execute":"cont"}` with no newline between
(the `qemu.qmp` library does exactly that). A value ends when its outermost `{...}` or `[...]` closes, counting
brackets outside strings only. Anything else at the top level (a bare number, a stray `}`) is returned as its own
chunk so that the caller can answer QEMU's "must be a JSON object" / parse error for it.

Limits keep a hostile client from making the server buffer without end: a value over `max_bytes` or nested
deeper than `max_depth` raises `StreamLimitError`, after which the connection should be closed.
"""

from __future__ import annotations

WHITESPACE = b" \t\r\n"
OPEN = b"{["
CLOSE = b"}]"
QUOTE = ord('"')
BACKSLASH = ord("\\")


class StreamLimitError(Exception):
    """A value grew past the size or nesting limit."""


class JsonSplitter:
    """Feed bytes, get complete top-level JSON texts (not yet parsed) back."""

    def __init__(self, max_bytes: int = 1 << 20, max_depth: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False  # inside a bare top-level token (number, true, garbage)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete value held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume `data`; return every value it completes, in order."""
        out: list[bytes] = []
        buf = self._buf
        for byte in data:
            if self._in_string:
                buf.append(byte)
                if self._escape:
                    self._escape = False
                elif byte == BACKSLASH:
                    self._escape = True
                elif byte == QUOTE:
                    self._in_string = False
                    if self._depth == 0:
                        out.append(self._take())
            elif self._depth == 0 and not self._scalar:
                if byte in WHITESPACE:
                    continue
                buf.append(byte)
                if byte in OPEN:
                    self._depth = 1
                elif byte == QUOTE:
                    self._in_string = True
                elif byte in CLOSE:
                    out.append(self._take())  # a stray closer: a parse error of its own
                else:
                    self._scalar = True
            elif self._scalar:
                if byte in WHITESPACE or byte in OPEN or byte in CLOSE or byte == QUOTE:
                    out.append(self._take())
                    out.extend(self.feed(bytes([byte])))
                    buf = self._buf
                else:
                    buf.append(byte)
            else:
                buf.append(byte)
                if byte == QUOTE:
                    self._in_string = True
                elif byte in OPEN:
                    self._depth += 1
                    if self._depth > self.max_depth:
                        raise StreamLimitError(f"JSON nesting deeper than {self.max_depth}")
                elif byte in CLOSE:
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(self._take())
            if len(buf) > self.max_bytes:
                raise StreamLimitError(f"QMP input exceeds {self.max_bytes} bytes")
        return out

    def _take(self) -> bytes:
        value = bytes(self._buf)
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._scalar = False
        return value
