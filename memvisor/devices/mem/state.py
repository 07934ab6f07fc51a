"""The virtio-mem device's own state as data: the plugged-block bitmap, requested and usable sizes, counters.

The plugged blocks' contents are in the device's memory region, which the snapshot saves like RAM (unplugged
blocks were discarded: they are holes in the file). Restore refuses a bitmap that does not fit the region
(wrong length), a requested or usable size beyond it or not in whole blocks, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memvisor.snapshot.codec import StateError, require

if TYPE_CHECKING:  # numpy and the device model (which needs numpy) only when a virtio-mem state is used
    import numpy as np

    from memvisor.devices.mem.device import VirtioMemDevice


@dataclass(frozen=True)
class MemState:
    block_size: int
    region_size: int
    plugged: bytes  # one bit per block, little-endian bit order (numpy packbits "little")
    requested_size: int
    usable_region_size: int
    counters: tuple[tuple[str, int], ...]

    def validate(self) -> None:
        require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "block_size",
                "is not a power of two")  # fmt: skip
        require(self.region_size > 0 and self.region_size % self.block_size == 0, "region_size",
                "is not a whole number of blocks")  # fmt: skip
        blocks = self.region_size // self.block_size
        require(len(self.plugged) == (blocks + 7) // 8, "plugged",
                f"is {len(self.plugged)} bytes, the region's {blocks} blocks need {(blocks + 7) // 8}")  # fmt: skip
        import numpy as np

        bits = np.unpackbits(np.frombuffer(self.plugged, np.uint8), bitorder="little")
        require(not bits[blocks:].any(), "plugged", "marks blocks past the end of the region")
        for name in ("requested_size", "usable_region_size"):
            value = getattr(self, name)
            require(0 <= value <= self.region_size and value % self.block_size == 0, name,
                    f"{value} is not a whole number of blocks inside the {self.region_size}-byte region")  # fmt: skip
        for name, value in self.counters:
            require(value >= 0, f"counters.{name}", "is negative")

    def plugged_blocks(self) -> np.ndarray:
        import numpy as np

        blocks = self.region_size // self.block_size
        return np.unpackbits(np.frombuffer(self.plugged, np.uint8), bitorder="little")[:blocks].astype(bool)


def save_mem(device: VirtioMemDevice) -> MemState:
    import numpy as np

    with device.lock:
        bits = device.plugged_blocks()
        return MemState(
            block_size=device.block_size,
            region_size=device.region_size,
            plugged=np.packbits(bits, bitorder="little").tobytes(),
            requested_size=device.requested_size,
            usable_region_size=device.usable_region_size,
            counters=tuple(sorted(device.counters.items())),
        )


def check_mem(device: VirtioMemDevice, state: MemState, where: str) -> None:
    if (state.block_size, state.region_size) != (device.block_size, device.region_size):
        raise StateError(
            f"{where}.region_size: the snapshot's virtio-mem had {state.region_size >> 20}M in "
            f"{state.block_size >> 20}M blocks, this one {device.region_size >> 20}M in {device.block_size >> 20}M: "
            "give the same max-size and block-size"
        )


def restore_mem(device: VirtioMemDevice, state: MemState) -> None:
    """Load the bitmap and sizes (the blocks' contents come with the memory image)."""
    from memvisor.devices.mem.device import COUNTER_NAMES

    with device.lock:
        device.load_plugged_state(state.plugged_blocks(), state.requested_size, state.usable_region_size)
        device.apply_plugged_access()  # plugged blocks readable before the memory image goes into them
        device.counters = {name: 0 for name in COUNTER_NAMES} | {n: v for n, v in state.counters if n in COUNTER_NAMES}
