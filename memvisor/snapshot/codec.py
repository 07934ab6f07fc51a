"""State types as data: frozen dataclasses encoded to JSON values and decoded back with every field checked.

A state read from a file or a socket is untrusted. `decode(cls, value)` walks `cls`'s annotated fields and
refuses (StateError, naming the field path like `vcpus[1].lapic`) a missing or unknown field, a wrong type,
a bytes field that is not base64, and whatever the type's own `validate()` refuses. Supported field types:
int, bool, str, bytes (base64 in JSON), nested state dataclasses, tuple[T, ...] and tuple[A, B] of those.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import types
import typing
from typing import Any, TypeVar

from memvisor.errors import MemvisorError

T = TypeVar("T")


class StateError(MemvisorError):
    """A saved state is malformed or does not fit this machine; the message names the field."""


def encode(value: Any) -> Any:
    """A state dataclass (or a field value) as JSON values: dicts, lists, ints, bools, strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple):
        return [encode(item) for item in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    raise TypeError(f"cannot encode {type(value).__name__} in a state")


def decode(cls: type[T], value: Any, path: str = "state") -> T:
    """Build `cls` from JSON values, checking every field; StateError names the first bad one."""
    result = _decode(cls, value, path)
    return typing.cast(T, result)


def _decode(annotation: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _decode_dataclass(annotation, value, path)
    if annotation is bool:
        if not isinstance(value, bool):
            raise StateError(f"{path}: expected true or false, got {_kind(value)}")
        return value
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise StateError(f"{path}: expected an integer, got {_kind(value)}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise StateError(f"{path}: expected a string, got {_kind(value)}")
        return value
    if annotation is bytes:
        if not isinstance(value, str):
            raise StateError(f"{path}: expected base64 bytes, got {_kind(value)}")
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise StateError(f"{path}: not valid base64") from None
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list):
            raise StateError(f"{path}: expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise StateError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_decode(arg, item, f"{path}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True)))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _decode(inner[0], value, path)
    raise TypeError(f"{path}: unsupported state field type {annotation!r}")


def _decode_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise StateError(f"{path}: expected an object, got {_kind(value)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise StateError(f"{path}.{unknown[0]}: unknown field")
    kwargs = {}
    for name in names:
        if name not in value:
            raise StateError(f"{path}.{name}: missing")
        kwargs[name] = _decode(hints[name], value[name], f"{path}.{name}")
    try:
        state = cls(**kwargs)
    except StateError as error:
        raise StateError(f"{path}.{error}") from None
    validate = getattr(state, "validate", None)
    if validate is not None:
        try:
            validate()
        except StateError as error:
            raise StateError(f"{path}.{error}") from None
    return state


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def require(condition: bool, field: str, message: str) -> None:
    """For `validate()` methods: raise StateError("field: message") unless `condition`."""
    if not condition:
        raise StateError(f"{field}: {message}")


def require_length(data: bytes, length: int, field: str) -> None:
    require(len(data) == length, field, f"is {len(data)} bytes, expected {length}")
