"""Writing the snapshot file (memvisor.snapshot.writer): a disk that fills up or fails mid-write leaves nothing
at the destination but the snapshot that was there, with an error naming the path and the space needed and
free; pages the guest hinted free (and did not write since) are left out, and the restore gives back every
other page exactly."""

import errno
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from memvisor.devices.balloon.testing import RAM_GPA, RAM_SIZE
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.snapshot import fileformat, writer
from memvisor.snapshot.memory import load_region
from memvisor.snapshot.writer import SnapshotWriteError, write_snapshot
from memvisor.vmm.snapshot import hinted_free
from tests.unit.test_dirty_log import BLOCK, CMD_AT, hinting_rig  # noqa: F401 (a fixture)

MiB = 1 << 20
PAGE = 4096


def _region(size: int = 8 * MiB, data_pages: range = range(0, 512), name: str = "ram0") -> MemoryRegion:
    region = MemoryRegion.memfd(0, size, name)
    for page in data_pages:
        region.view[page * PAGE : (page + 1) * PAGE] = bytes([page % 251 + 1]) * PAGE
    return region


def _load(path: Path, size: int = 8 * MiB) -> MemoryRegion:
    target = MemoryRegion.memfd(0, size, "ram0")
    fd = os.open(path, os.O_RDONLY)
    try:
        _, image = fileformat.read_header_and_state(fd)
        load_region(fd, target, image.regions[0], "memory.regions[0]", lambda n: None)
    finally:
        os.close(fd)
    return target


def _leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".partial"))


def _old_snapshot(path: Path) -> bytes:
    region = _region(data_pages=range(3))
    write_snapshot(path, {"old": True}, [region], lambda n: None)
    region.close()
    return path.read_bytes()


def test_a_complete_save_replaces_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    old = _old_snapshot(path)
    region = _region()
    written = write_snapshot(path, {"new": True}, [region], lambda n: None)
    assert written.bytes_written == 512 * PAGE and written.free_skipped == 0
    assert path.read_bytes() != old and _leftovers(tmp_path) == []
    assert path.stat().st_mode & 0o777 == 0o600
    assert bytes(_load(path).view) == bytes(region.view)


def test_a_symlinked_path_writes_the_file_it_names_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "vm.snap"
    _old_snapshot(target)
    link = tmp_path / "latest.snap"
    link.symlink_to(target)
    region = _region()
    write_snapshot(link, {"new": True}, [region], lambda n: None)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert bytes(_load(target).view) == bytes(region.view)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "store") == []


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, ["needs about", "free", "another filesystem"]),
                                             (errno.EIO, ["Input/output error"])])  # fmt: skip
def test_a_write_error_midway_removes_the_partial_file_and_keeps_the_old_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: list[str]
) -> None:
    path = tmp_path / "vm.snap"
    old = _old_snapshot(path)
    region = _region()
    calls = []
    real_pwrite = os.pwrite

    def failing_pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 2:  # the bitmap and a first run of pages went out
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(SnapshotWriteError) as caught:
        write_snapshot(path, {"new": True}, [region], lambda n: None)
    monkeypatch.undo()
    message = str(caught.value)
    assert str(path) in message and "the guest was not changed" in message
    for word in words:
        assert word in message
    assert path.read_bytes() == old  # the earlier snapshot is intact ...
    assert _leftovers(tmp_path) == []  # ... and no partial file is left beside it


def test_too_little_free_space_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "free_space", lambda directory: 1 * MiB)
    path = tmp_path / "vm.snap"
    with pytest.raises(SnapshotWriteError, match=r"needs about 2\.\d MiB, .* has 1\.0 MiB free"):
        write_snapshot(path, {}, [_region()], lambda n: None)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def small_filesystem(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs (needs root and mount(8)); skipped where it cannot be made."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_filesystem(small_filesystem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = small_filesystem / "vm.snap"
    old = _old_snapshot(path)  # 3 pages: fits
    region = _region()  # 2 MiB of data: does not
    with pytest.raises(SnapshotWriteError, match=r"needs about 2\.\d MiB, .* has [01]\.\d MiB free"):
        write_snapshot(path, {}, [region], lambda n: None)
    assert path.read_bytes() == old and _leftovers(small_filesystem) == []
    # Without the check up front (space taken by someone else meanwhile) the disk fills up mid-write.
    monkeypatch.setattr(writer, "free_space", lambda directory: None)
    with pytest.raises(SnapshotWriteError, match=r"not enough space for snapshot .*vm\.snap: it needs about 2\.\d MiB"):
        write_snapshot(path, {}, [region], lambda n: None)
    assert path.read_bytes() == old and _leftovers(small_filesystem) == []
    assert os.statvfs(small_filesystem).f_bfree * os.statvfs(small_filesystem).f_frsize > 900 * 1024  # freed


def test_hinted_free_pages_are_left_out_and_every_other_page_restores_exactly(tmp_path: Path) -> None:
    region = _region(data_pages=range(0, 2048))  # 8 MiB, every page with data
    free = np.zeros(2048, dtype=bool)
    free[1024:2048] = True  # the guest hinted the upper 4 MiB free
    full, hinted = tmp_path / "full.snap", tmp_path / "hinted.snap"
    write_snapshot(full, {}, [region], lambda n: None)
    written = write_snapshot(hinted, {}, [region], lambda n: None, free={"ram0": free})
    assert written.free_skipped == 1024 * PAGE and written.bytes_written == 1024 * PAGE
    assert hinted.stat().st_blocks * 512 <= full.stat().st_blocks * 512 - 4 * MiB
    restored = _load(hinted)
    assert restored.allocated_bytes() == 1024 * PAGE  # the hinted pages stay holes in guest RAM
    assert bytes(restored.view[: 1024 * PAGE]) == bytes(region.view[: 1024 * PAGE])
    assert not np.frombuffer(restored.view[1024 * PAGE :], dtype=np.uint64).any()  # hinted: zeros


def test_the_snapshot_skips_only_hints_the_guest_did_not_write_since(hinting_rig: Any) -> None:  # noqa: F811
    adapter, driver, log = hinting_rig
    machine = SimpleNamespace(devices=[SimpleNamespace(device=adapter.device)], dirty_pages=log.dirty_pages)
    ram = MemoryRegion.memfd(RAM_GPA, RAM_SIZE, "ram")
    machine.dirty_logging = False
    assert hinted_free(machine, [ram]) == {}  # type: ignore[arg-type]  # no round: nothing skipped
    driver.send_cmd_id(adapter.hint_start().cmd_id, CMD_AT)
    blocks = [RAM_GPA + 4 * MiB, RAM_GPA + 12 * MiB]
    driver.hint([(gpa, BLOCK) for gpa in blocks])
    adapter.hint_stop()  # DONE: the guest takes its blocks back ...
    log.write(blocks[1] + 5 * PAGE, 2 * PAGE)  # ... and writes two pages of one
    machine.dirty_logging = log.dirty_logging
    masks = hinted_free(machine, [ram])  # type: ignore[arg-type]
    expected = np.zeros(RAM_SIZE // PAGE, dtype=bool)
    for gpa in blocks:
        first = (gpa - RAM_GPA) // PAGE
        expected[first : first + BLOCK // PAGE] = True
    written_first = (blocks[1] - RAM_GPA) // PAGE + 5
    expected[written_first : written_first + 2] = False
    assert np.array_equal(masks["ram"], expected)
    # A page poison value: a skipped page would come back as zeros instead of the poison, so nothing is.
    adapter.device.poison_val = 0xAA
    adapter.device._features |= 1 << 4  # VIRTIO_BALLOON_F_PAGE_POISON negotiated
    assert hinted_free(machine, [ram]) == {}  # type: ignore[arg-type]
    ram.close()
