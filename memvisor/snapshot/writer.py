"""Writing a snapshot file so that a failure never leaves a file that looks like a snapshot.

    written = write_snapshot(path, machine_json, regions, progress, free={"ram0": mask})

- The pages to write are decided first (memvisor.snapshot.memory.present_pages: backed and not all zeros,
  minus the pages `free` names: hinted free by the guest and not written since), so the space they need is
  known before anything is written: with less free space than that in the destination's filesystem
  (statvfs f_bavail, f_bfree for root) the save is refused at once, naming the path, the space needed and the space free.
- The file is written under a temporary name in the destination's directory (`.NAME.XXXX.partial`, mode
  0600), fsynced (the header last, memvisor.snapshot.fileformat), then renamed over PATH and the directory
  fsynced: a snapshot already at PATH stays whole until the new one is complete.
- Any OSError while writing (the disk filling up meanwhile, an I/O error) removes the temporary file and is
  raised as SnapshotWriteError with the reason; for ENOSPC/EDQUOT again the space needed and free.

The caller (memvisor.vmm.snapshot.save_snapshot) holds the machine quiesced; nothing here touches it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memvisor.errors import MemvisorError
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot import fileformat
from memvisor.snapshot.fileformat import PAGE_SIZE
from memvisor.snapshot.memory import present_pages, save_region

STATE_SLACK = 64 << 10  # the memory part of the state (checksums, offsets) on top of the machine's JSON
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class SnapshotWriteError(MemvisorError):
    """The snapshot could not be written; no file was left at the destination (an older one is intact)."""


@dataclass(frozen=True)
class Written:
    bytes_written: int  # guest page bytes written
    total_bytes: int  # guest RAM the file covers
    file_size: int
    allocated: int  # bytes the file takes on disk
    free_skipped: int  # bytes of pages with data left out because the guest hinted them free


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def free_space(directory: Path) -> int | None:
    """Bytes this process may still write in `directory`'s filesystem (None if it cannot be asked): root may
    use the blocks the filesystem reserves for it (f_bfree), anyone else only f_bavail."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize


def pages_to_write(region: MemoryRegion, free: np.ndarray | None) -> tuple[np.ndarray, int]:
    """A bool per page of `region` to write, and how many pages with data `free` took out."""
    present = present_pages(region)
    if free is None:
        return present, 0
    if free.shape != present.shape:
        raise ValueError(f"{region.name}: free mask of {free.shape} for {present.size} pages")
    skipped = int(np.count_nonzero(present & free))
    return present & ~free, skipped


def space_needed(masks: Sequence[np.ndarray], regions: Sequence[MemoryRegion], machine_json: Any) -> int:
    """About the bytes the file will allocate: header page, bitmaps, pages and state."""
    data = sum(int(np.count_nonzero(mask)) for mask in masks) * PAGE_SIZE
    bitmaps = sum(fileformat.align_up(fileformat.bitmap_bytes(region.size)) for region in regions)
    state = len(json.dumps(machine_json, separators=(",", ":"))) + STATE_SLACK
    state += sum(8 * fileformat.chunk_count(region.size) for region in regions)  # base64 of 4-byte checksums
    return PAGE_SIZE + bitmaps + data + fileformat.align_up(state)


def _no_space_message(path: Path, needed: int, free: int | None) -> str:
    have = f"{mib(free)} free" if free is not None else "an unknown amount free"
    return (f"not enough space for snapshot {path}: it needs about {mib(needed)}, {path.parent} has {have}: "
            f"free some space or save to another filesystem; the guest was not changed")  # fmt: skip


def write_snapshot(
    path: Path,
    machine_json: Any,
    regions: Sequence[MemoryRegion],
    progress: Callable[[int], None],
    free: Mapping[str, np.ndarray] | None = None,
) -> Written:
    """Write the snapshot of `regions` (guest RAM) and `machine_json` (the encoded MachineState) to `path`.

    `free`: per region name, a bool per page the guest does not rely on (hinted free, unwritten since): not
    written, restored as zeros. Raises SnapshotWriteError; then nothing is left at `path` but what was there.
    """
    if path.is_symlink():  # write through the link: the file it names gets the snapshot, the link stays
        path = path.resolve()
    masks, skipped = [], 0
    for region in regions:
        mask, left_out = pages_to_write(region, None if free is None else free.get(region.name))
        masks.append(mask)
        skipped += left_out
    needed = space_needed(masks, regions, machine_json)
    available = free_space(path.parent)
    if available is not None and needed > available:
        raise SnapshotWriteError(_no_space_message(path, needed, available))
    layout = fileformat.layout_regions([(r.name, r.gpa, r.size) for r in regions])
    state_offset = fileformat.align_up(layout[-1][1] + regions[-1].size)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as error:
        raise SnapshotWriteError(f"cannot create snapshot file {path}: {error.strerror}") from None
    written = 0

    def count(size: int) -> None:
        nonlocal written
        written += size
        progress(size)

    try:
        try:
            os.ftruncate(fd, state_offset)
            images = [
                save_region(fd, region, region.name, bitmap, data, count, present=mask)
                for region, (bitmap, data), mask in zip(regions, layout, masks, strict=True)
            ]
            fileformat.write_header_and_state(
                fd, state_offset, machine_json, fileformat.MemoryImage(tuple(images))
            )
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if error.errno in NO_SPACE:
            raise SnapshotWriteError(_no_space_message(path, needed, free_space(path.parent))) from None
        raise SnapshotWriteError(
            f"writing snapshot {path} failed: {error.strerror}; the guest was not changed"
        ) from None
    _sync_directory(path.parent)
    total = sum(region.size for region in regions)
    return Written(written, total, stat.st_size, stat.st_blocks * 512, skipped * PAGE_SIZE)


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (a crash after it finds the new file, never a name without its data)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
