"""A small QOM (QEMU Object Model) tree over the machine, for `qom-list`, `qom-get` and `qom-set`.

QEMU names every object by a path; user-created devices live at /machine/peripheral/ID, and a path without a
leading slash is a *partial* path that names the one object whose path ends with it ("vm0" is
/machine/peripheral/vm0). memvisor builds the tree afresh for each command from the machine's current devices:

    /                      container
    /machine               memvisor-machine
    /machine/peripheral    container
        ID                 virtio-mem | virtio-pmem | virtio-balloon-device

Each property has QEMU's name and QOM type (seen in QEMU 7.2's `qom-list`), a getter and, if settable, a setter
that checks the value as QEMU does and gives QEMU's error text. `max-size` on virtio-mem and `size` on
virtio-pmem are memvisor's own (QEMU keeps them on the memory backend, which memvisor does not have).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from memvisor.control.args import UINT64_MAX, is_int
from memvisor.control.errors import DEVICE_NOT_FOUND, QmpError
from memvisor.control.machine_api import BalloonControl, MachineControl, VirtioMemInfo, VirtioPmemInfo

PERIPHERAL = "/machine/peripheral"
TYPE_VIRTIO_MEM = "virtio-mem"
TYPE_VIRTIO_PMEM = "virtio-pmem"
TYPE_BALLOON = "virtio-balloon-device"
UINT32_MAX = (1 << 32) - 1


def memdev_path(device_id: str) -> str:
    """The `memdev` memvisor reports for a device: its implicit backend object (no separate -object)."""
    return f"/objects/{device_id}-mem"


@dataclass
class Prop:
    """One QOM property: QEMU's name and type string, a getter, and a setter if it is writable."""

    name: str
    qom_type: str
    get: Callable[[], Any]
    set: Callable[[Any], None] | None = None


@dataclass
class QomNode:
    """An object in the tree."""

    path: str
    type_name: str
    props: list[Prop] = field(default_factory=list)
    children: dict[str, QomNode] = field(default_factory=dict)

    def add_child(self, name: str, child: QomNode) -> None:
        self.children[name] = child

    def walk(self) -> Iterator[QomNode]:
        yield self
        for child in self.children.values():
            yield from child.walk()

    def all_props(self) -> list[Prop]:
        """`type`, then one child<...> property per child, then the object's own properties."""
        child_props = [
            Prop(name, f"child<{child.type_name}>", lambda child=child: child.path)  # type: ignore[misc]
            for name, child in self.children.items()
        ]
        return [Prop("type", "string", lambda: self.type_name), *child_props, *self.props]

    def prop(self, name: str) -> Prop:
        for prop in self.all_props():
            if prop.name == name:
                return prop
        raise QmpError(f"Property '{self.type_name}.{name}' not found")


def _uint64(name: str, value: Any) -> int:
    if not is_int(value) or not 0 <= value <= UINT64_MAX:
        raise QmpError(f"Parameter '{name}' expects uint64")
    return int(value)


def _virtio_mem_node(machine: MachineControl, info: VirtioMemInfo) -> QomNode:
    def current() -> VirtioMemInfo:
        for dev in machine.memory_devices():
            if isinstance(dev, VirtioMemInfo) and dev.id == info.id:
                return dev
        raise QmpError(f"Device '{info.id}' not found", DEVICE_NOT_FOUND)

    def set_requested(value: Any) -> None:
        size = _uint64("requested-size", value)
        dev = current()
        if size % dev.block_size:
            raise QmpError(f"'requested-size' has to be multiples of 'block-size' (0x{dev.block_size:x})")
        if size > dev.max_size:
            raise QmpError(f"'requested-size' cannot exceed the memory backend size(0x{dev.max_size:x})")
        machine.set_requested_size(dev.id, size)

    return QomNode(
        f"{PERIPHERAL}/{info.id}",
        TYPE_VIRTIO_MEM,
        [
            Prop("memaddr", "uint64", lambda: current().memaddr),
            Prop("memdev", "link<memory-backend>", lambda: memdev_path(info.id)),
            Prop("node", "uint32", lambda: current().node),
            Prop("requested-size", "size", lambda: current().requested_size, set_requested),
            Prop("block-size", "size", lambda: current().block_size),
            Prop("size", "size", lambda: current().size),
            Prop("max-size", "size", lambda: current().max_size),
        ],
    )


def _virtio_pmem_node(info: VirtioPmemInfo) -> QomNode:
    return QomNode(
        f"{PERIPHERAL}/{info.id}",
        TYPE_VIRTIO_PMEM,
        [
            Prop("memaddr", "uint64", lambda: info.memaddr),
            Prop("memdev", "link<memory-backend>", lambda: memdev_path(info.id)),
            Prop("size", "size", lambda: info.size),
        ],
    )


def set_polling_interval(balloon: BalloonControl, value: Any) -> None:
    """QEMU's checks and texts for guest-stats-polling-interval (hw/virtio/virtio-balloon.c)."""
    if not is_int(value):
        raise QmpError("Invalid parameter type for 'guest-stats-polling-interval', expected: integer")
    if value < 0:
        raise QmpError("timer value must be greater than zero")
    if value > UINT32_MAX:
        raise QmpError("timer value is too big")
    balloon.set_stats_polling_interval(int(value))


def _balloon_node(balloon: BalloonControl) -> QomNode:
    return QomNode(
        f"{PERIPHERAL}/{balloon.id}",
        TYPE_BALLOON,
        [
            Prop("guest-stats", "guest statistics", balloon.guest_stats),
            Prop(
                "guest-stats-polling-interval",
                "int",
                balloon.stats_polling_interval,
                lambda value: set_polling_interval(balloon, value),
            ),
        ],
    )


def build_tree(machine: MachineControl) -> QomNode:
    """The tree for the machine's devices as they are now."""
    root = QomNode("/", "container")
    machine_node = QomNode("/machine", "memvisor-machine")
    peripheral = QomNode(PERIPHERAL, "container")
    root.add_child("machine", machine_node)
    machine_node.add_child("peripheral", peripheral)
    balloon = machine.balloon()
    if balloon is not None:
        peripheral.add_child(balloon.id, _balloon_node(balloon))
    for dev in machine.memory_devices():
        if isinstance(dev, VirtioMemInfo):
            peripheral.add_child(dev.id, _virtio_mem_node(machine, dev))
        else:
            peripheral.add_child(dev.id, _virtio_pmem_node(dev))
    return root


def resolve(root: QomNode, path: str) -> QomNode:
    """Find the object at `path`: absolute (/machine/peripheral/vm0) or partial (vm0), as QEMU resolves them."""
    if path.startswith("/"):
        node = root
        for part in (p for p in path.split("/") if p):
            child = node.children.get(part)
            if child is None:
                raise QmpError(f"Device '{path}' not found", DEVICE_NOT_FOUND)
            node = child
        return node
    suffix = "/" + path.strip("/")
    matches = [node for node in root.walk() if path and node.path.endswith(suffix)]
    if len(matches) != 1:  # none, or ambiguous: QEMU says "not found" for both
        raise QmpError(f"Device '{path}' not found", DEVICE_NOT_FOUND)
    return matches[0]


def qom_list(node: QomNode) -> list[dict[str, str]]:
    """`qom-list`: every property's name and QOM type."""
    return [{"name": prop.name, "type": prop.qom_type} for prop in node.all_props()]


def qom_get(node: QomNode, name: str) -> Any:
    """`qom-get`: a property's value."""
    return node.prop(name).get()


def qom_set(node: QomNode, name: str, value: Any) -> None:
    """`qom-set`: write a property, QmpError if it is read-only or the value is refused."""
    prop = node.prop(name)
    if prop.set is None:
        raise QmpError(f"Property '{node.type_name}.{name}' is not writable")
    prop.set(value)
