"""The plugged-block bitmap of a virtio-mem device: one bool per device block.

Block `i` covers [addr + i*block_size, addr + (i+1)*block_size). The bitmap answers the questions the
requests ask (are all of these blocks plugged? all unplugged?) and lists the plugged runs so that
UNPLUG_ALL and a system reset discard whole ranges at once instead of block by block.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class BlockBitmap:
    """Which of `count` blocks are plugged. Ranges are (first, count) and must lie inside the bitmap."""

    def __init__(self, count: int):
        self._bits = np.zeros(count, dtype=bool)

    def __len__(self) -> int:
        return len(self._bits)

    @property
    def plugged_count(self) -> int:
        return int(np.count_nonzero(self._bits))

    def all_plugged(self, first: int, count: int) -> bool:
        return bool(self._bits[first:first + count].all())

    def all_unplugged(self, first: int, count: int) -> bool:
        return not self._bits[first:first + count].any()

    def to_array(self) -> np.ndarray:
        """A copy of the bitmap, one bool per block."""
        return self._bits.copy()

    def load(self, plugged: np.ndarray) -> None:
        """Replace every bit with `plugged` (one bool per block; ValueError for another length)."""
        if len(plugged) != len(self._bits):
            raise ValueError(f"{len(plugged)} blocks given for a bitmap of {len(self._bits)}")
        self._bits[:] = plugged

    def set_range(self, first: int, count: int, plugged: bool) -> None:
        self._bits[first:first + count] = plugged

    def plugged_runs(self) -> Iterator[tuple[int, int]]:
        """Each maximal run of plugged blocks as (first, count), in address order."""
        padded = np.concatenate(([False], self._bits, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        for start, stop in zip(edges[0::2], edges[1::2], strict=True):
            yield int(start), int(stop - start)
