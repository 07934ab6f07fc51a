"""Helpers the guest tests and the memory benchmark measure with: they must be right, or a test proves nothing.

- memfd_bytes (tests/guest/vm.py): host memory of a process read from outside, through /proc/PID/fd;
- frames_inside (tests/guest/test_hinting.py): which of a file's page frames lie in the hinted ranges.
"""

from __future__ import annotations

import mmap
import os

from tests.guest.test_hinting import frames_inside
from tests.guest.vm import memfd_bytes

MiB = 1 << 20


def test_memfd_bytes_counts_touched_blocks_once_per_file_and_by_name() -> None:
    # Names no other test's leftovers in this process carry.
    ram_name, other_name = "memvisor-ram-helpertest", "memvisor-mem-helpertest"
    ram = os.memfd_create(ram_name)
    other = os.memfd_create(other_name)
    again = os.dup(ram)  # a second descriptor of the same file: counted once
    try:
        os.ftruncate(ram, 8 * MiB)
        os.ftruncate(other, 4 * MiB)
        with mmap.mmap(ram, 8 * MiB) as view:
            view[: 3 * MiB] = b"x" * (3 * MiB)
        with mmap.mmap(other, 4 * MiB) as view:
            view[: MiB] = b"y" * MiB
        pid = os.getpid()
        assert memfd_bytes(pid, lambda name: name == ram_name) == 3 * MiB
        assert memfd_bytes(pid, lambda name: name == other_name) == MiB
        assert memfd_bytes(pid, lambda name: name in (ram_name, other_name)) == 4 * MiB
        os.ftruncate(ram, 0)  # what a discard does to the blocks
        assert memfd_bytes(pid, lambda name: name == ram_name) == 0
    finally:
        for fd in (ram, other, again):
            os.close(fd)


def test_frames_inside_finds_exactly_the_frames_in_the_ranges() -> None:
    ranges = [(10, 20), (30, 31)]  # [first PFN, end PFN)
    frames = [(5, 6), (19, 3), (30, 1), (31, 4)]  # 5..10, 19..21, 30, 31..34
    assert frames_inside(frames, ranges) == [10, 19, 30]
    assert frames_inside(frames, []) == []
