"""`--device` options in QEMU's words: `virtio-balloon,id=balloon0,free-page-reporting=on`, and friends.

Each device type has a table of properties with a parser and a default; an unknown type or property, or a
bad value, is a UsageError naming it and what would be right.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor.errors import UsageError
from memvisor.units import parse_size


def _bool(text: str, what: str) -> bool:
    if text in ("on", "yes", "true"):
        return True
    if text in ("off", "no", "false"):
        return False
    raise UsageError(f"{what}={text!r} is not a boolean: write on or off")


def _uint(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):  # "²".isdigit() is true, int("²") fails
        raise UsageError(f"{what}={text!r} is not a whole number")
    return int(text)


def _size(text: str, what: str) -> int:
    return parse_size(text, what)


def _string(text: str, what: str) -> str:
    if not text:
        raise UsageError(f"{what} is empty: give a value")
    return text


Parser = Callable[[str, str], Any]
# type -> {property: (parser, default)}; default None means "required" unless listed in OPTIONAL.
DEVICE_PROPERTIES: dict[str, dict[str, tuple[Parser, Any]]] = {
    "virtio-balloon": {
        "id": (_string, "balloon0"),
        "deflate-on-oom": (_bool, False),
        "free-page-reporting": (_bool, False),
        "free-page-hint": (_bool, False),
        "guest-stats-polling-interval": (_uint, 0),
    },
    "virtio-mem": {
        "id": (_string, "vm0"),
        "max-size": (_size, None),
        "requested-size": (_size, 0),
        "block-size": (_size, 2 << 20),
        "node": (_uint, 0),
        "prealloc": (_bool, False),
        "unplugged-inaccessible": (_bool, True),
    },
    "virtio-pmem": {
        "id": (_string, "pm0"),
        "file": (_string, None),
        "size": (_size, 0),
        "readonly": (_bool, False),
    },
}
REQUIRED = {"virtio-mem": ("max-size",), "virtio-pmem": ("file",)}


@dataclass
class DeviceSpec:
    type: str
    properties: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.properties["id"])


def parse_device_spec(text: str) -> DeviceSpec:
    kind, _, rest = text.partition(",")
    table = DEVICE_PROPERTIES.get(kind)
    if table is None:
        raise UsageError(f"unknown --device {kind!r}: memvisor has {', '.join(sorted(DEVICE_PROPERTIES))}")
    values = {name: default for name, (_, default) in table.items()}
    for item in filter(None, rest.split(",")):
        name, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"--device {kind}: {item!r} is not name=value")
        if name not in table:
            raise UsageError(f"--device {kind} has no property {name!r}: it has {', '.join(table)}")
        values[name] = table[name][0](value, f"{kind} {name}")
    for name in REQUIRED.get(kind, ()):
        if values[name] is None:
            raise UsageError(f"--device {kind} needs {name}=..., e.g. {kind},{name}={'4G' if 'size' in name else 'disk.img'}")
    return DeviceSpec(kind, values)


def parse_device_specs(texts: list[str]) -> list[DeviceSpec]:
    specs = [parse_device_spec(text) for text in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.id in seen:
            raise UsageError(f"two devices have id {spec.id!r}: give each its own id=")
        seen.add(spec.id)
    if sum(spec.type == "virtio-balloon" for spec in specs) > 1:
        raise UsageError("only one virtio-balloon device is allowed")
    return specs


def files_named(texts: list[str]) -> list[Path]:
    """Host files the devices use (pmem backing files), for sharing into the lab."""
    return [Path(spec.properties["file"]) for spec in parse_device_specs(texts) if spec.type == "virtio-pmem"]
