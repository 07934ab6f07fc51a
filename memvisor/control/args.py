"""Checking a QMP command's `arguments` the way QEMU's QAPI input visitor does, with QEMU's error text.

    Parameter 'value' is missing
    Parameter 'bogus' is unexpected
    Invalid parameter type for 'value', expected: integer

Integers are JSON numbers without a fraction that fit the declared range (int64 unless told otherwise); a JSON
`true` is a boolean, never an integer (Python's `bool` is an `int`, so that is checked explicitly).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memvisor.control.errors import QmpError

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


class Kind(enum.Enum):
    """A QAPI argument type; `word` is what QEMU calls it in 'expected: ...'."""

    STR = ("string", 0)
    INT = ("integer", 1)  # int64
    UINT = ("integer", 2)  # uint64 (same word in QEMU's message; the number keeps the members distinct)
    NUMBER = ("number", 3)  # int or float
    BOOL = ("boolean", 4)
    OBJECT = ("object", 5)
    ARRAY = ("array", 6)
    ANY = ("any", 7)

    @property
    def word(self) -> str:
        return self.value[0]


@dataclass(frozen=True)
class Arg:
    """One declared argument: its QMP name, its type, whether it may be left out."""

    name: str
    kind: Kind
    required: bool = True


def is_int(value: object) -> bool:
    """True for a JSON integer (not a boolean, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(kind: Kind, value: object) -> bool:
    if kind is Kind.ANY:
        return True
    if kind is Kind.STR:
        return isinstance(value, str)
    if kind is Kind.INT:
        return is_int(value) and INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]
    if kind is Kind.UINT:
        return is_int(value) and 0 <= value <= UINT64_MAX  # type: ignore[operator]
    if kind is Kind.NUMBER:
        return (is_int(value) and INT64_MIN <= value <= UINT64_MAX) or isinstance(value, float)  # type: ignore[operator]
    if kind is Kind.BOOL:
        return isinstance(value, bool)
    if kind is Kind.OBJECT:
        return isinstance(value, dict)
    return isinstance(value, list)


def check_args(spec: tuple[Arg, ...], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `arguments` against `spec`; return them as a dict, or raise QmpError with QEMU's text.

    QEMU reports, in this order: a missing required argument, then a mistyped one (both in declaration order),
    then the first unexpected one.
    """
    for arg in spec:
        if arg.name not in arguments:
            if arg.required:
                raise QmpError(f"Parameter '{arg.name}' is missing")
            continue
        if not _fits(arg.kind, arguments[arg.name]):
            raise QmpError(f"Invalid parameter type for '{arg.name}', expected: {arg.kind.word}")
    known = {arg.name for arg in spec}
    for name in arguments:
        if name not in known:
            raise QmpError(f"Parameter '{name}' is unexpected")
    return dict(arguments)
