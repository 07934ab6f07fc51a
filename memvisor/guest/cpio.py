"""A writer (and a reader, for tests) of "newc" cpio archives: the format Linux unpacks as an initramfs.

Each member is a 110-byte ASCII header, its NUL-terminated name padded to 4 bytes, then its data padded to
4 bytes; the archive ends with a member named `TRAILER!!!` (Linux Documentation/driver-api/early-userspace/
buffer-format.rst, and cpio(5) "New ASCII Format"). Writing it ourselves means the archive can hold device
nodes (`/dev/console`) and root-owned files without running as root, and is byte-for-byte reproducible:
every member gets uid/gid 0 and mtime 0.
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
# cpio(5) New ASCII Format: magic + 13 eight-digit hex fields (ino, mode, uid, gid, nlink, mtime, filesize,
# devmajor, devminor, rdevmajor, rdevminor, namesize, check).
HEADER_SIZE = 6 + 13 * 8
_COPY_CHUNK = 1 << 20

EntryKind = Literal["dir", "file", "symlink", "chardev", "blockdev"]
_TYPE_BITS: dict[str, int] = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
}


@dataclass(frozen=True)
class InitramfsEntry:
    """One member of an initramfs.

    `path` is relative to the archive root ("bin/busybox", no leading slash). A file's content comes from
    `data` or, for large files, from `source` (streamed, never read whole). A symlink's target is `target`.
    Device nodes carry `rdev` = (major, minor). `mode` holds the permission bits only.
    """

    path: str
    kind: EntryKind
    mode: int = 0o755
    data: bytes | None = None
    source: Path | None = None
    target: str = ""
    rdev: tuple[int, int] = (0, 0)

    def size(self) -> int:
        """The member's data size in bytes (the link target for a symlink)."""
        if self.kind == "symlink":
            return len(self.target.encode())
        if self.kind != "file":
            return 0
        if self.data is not None:
            return len(self.data)
        if self.source is not None:
            return self.source.stat().st_size
        return 0


def directory(path: str, mode: int = 0o755) -> InitramfsEntry:
    """A directory member."""
    return InitramfsEntry(path, "dir", mode)


def file_from_bytes(path: str, data: bytes, mode: int = 0o644) -> InitramfsEntry:
    """A regular file member holding `data`."""
    return InitramfsEntry(path, "file", mode, data=data)


def file_from_path(path: str, source: Path, mode: int | None = None) -> InitramfsEntry:
    """A regular file member copied from `source` (its permission bits unless `mode` is given)."""
    if mode is None:
        mode = stat.S_IMODE(source.stat().st_mode)
    return InitramfsEntry(path, "file", mode, source=source)


def symlink(path: str, target: str) -> InitramfsEntry:
    """A symbolic link member pointing at `target`."""
    return InitramfsEntry(path, "symlink", 0o777, target=target)


def char_device(path: str, major: int, minor: int, mode: int = 0o600) -> InitramfsEntry:
    """A character device node (e.g. `dev/console`, 5:1), which the kernel needs before devtmpfs exists."""
    return InitramfsEntry(path, "chardev", mode, rdev=(major, minor))


def entries_from_tree(root: Path) -> list[InitramfsEntry]:
    """Every directory, file and symlink below `root`, parents before children, sorted by name.

    Hard links are stored as independent copies; sockets and fifos are skipped.
    """
    entries: list[InitramfsEntry] = []

    def walk(folder: Path, prefix: str) -> None:
        for child in sorted(folder.iterdir(), key=lambda p: p.name):
            rel = f"{prefix}{child.name}"
            st = child.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append(symlink(rel, str(child.readlink())))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(directory(rel, stat.S_IMODE(st.st_mode)))
                walk(child, rel + "/")
            elif stat.S_ISREG(st.st_mode):
                entries.append(file_from_path(rel, child, stat.S_IMODE(st.st_mode)))

    walk(root, "")
    return entries


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, mode: int, nlink: int, filesize: int, rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev[0], rdev[1], namesize, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _write_member(out: BinaryIO, entry: InitramfsEntry, ino: int) -> None:
    name = entry.path.strip("/").encode() + b"\0"
    size = entry.size()
    mode = _TYPE_BITS[entry.kind] | (entry.mode & 0o7777)
    nlink = 2 if entry.kind == "dir" else 1
    head = _header(ino, mode, nlink, size, entry.rdev, len(name)) + name
    out.write(head + _pad4(len(head)))
    if entry.kind == "symlink":
        out.write(entry.target.encode())
    elif entry.kind == "file" and entry.data is not None:
        out.write(entry.data)
    elif entry.kind == "file" and entry.source is not None:
        written = 0
        with entry.source.open("rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise OSError(f"{entry.source} changed size while it was archived")
    out.write(_pad4(size))


def write_newc(out: BinaryIO, entries: Iterable[InitramfsEntry]) -> None:
    """Write `entries` as a newc archive (with its trailer) to the binary stream `out`."""
    ino = 1
    for entry in entries:
        if not entry.path.strip("/"):
            continue  # the root itself: the kernel's rootfs already exists
        _write_member(out, entry, ino)
        ino += 1
    trailer = _header(0, 0, 1, 0, (0, 0), len(TRAILER_NAME) + 1) + TRAILER_NAME.encode() + b"\0"
    out.write(trailer + _pad4(len(trailer)))


def write_archive(path: Path, entries: Iterable[InitramfsEntry], *, compress: bool = False) -> None:
    """Write `entries` to the file `path`, gzip-compressed when `compress` (the kernel unpacks either)."""
    with path.open("wb") as raw:
        if compress:
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                write_newc(gz, entries)  # type: ignore[arg-type]  # GzipFile is a binary stream
        else:
            write_newc(raw, entries)


@dataclass(frozen=True)
class CpioMember:
    """A member read back from a newc archive."""

    name: str
    mode: int
    nlink: int
    rdev: tuple[int, int]
    data: bytes


class CpioFormatError(ValueError):
    """The bytes are not a well-formed newc archive."""


def read_newc(blob: bytes) -> Iterator[CpioMember]:
    """Parse a newc archive (gzip-compressed or not), yielding members up to the trailer."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    stream = io.BytesIO(blob)
    while True:
        offset = stream.tell()
        head = stream.read(HEADER_SIZE)
        if len(head) != HEADER_SIZE or head[:6] != NEWC_MAGIC:
            raise CpioFormatError(f"no newc header at offset {offset}")
        try:
            fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise CpioFormatError(f"bad hex field in header at offset {offset}") from exc
        mode, nlink, filesize, rdev_major, rdev_minor, namesize = (
            fields[1],
            fields[4],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_raw = stream.read(namesize)
        if len(name_raw) != namesize or not name_raw.endswith(b"\0"):
            raise CpioFormatError(f"truncated name at offset {offset}")
        stream.read(-(HEADER_SIZE + namesize) % 4)
        name = name_raw[:-1].decode()
        if name == TRAILER_NAME:
            return
        data = stream.read(filesize)
        if len(data) != filesize:
            raise CpioFormatError(f"truncated data of {name!r}")
        stream.read(-filesize % 4)
        yield CpioMember(name, mode, nlink, (rdev_major, rdev_minor), data)
