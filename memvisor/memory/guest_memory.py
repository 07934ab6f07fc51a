"""Guest physical memory: regions, their host backing, and the one checked accessor to them.

A `MemoryRegion` is one contiguous range of guest physical addresses (GPA) backed by a host mapping:

- `MemoryRegion.memfd`: guest RAM in a memfd mapped MAP_SHARED (what KVM, migration and discard want), of
  4 KiB pages, transparent huge pages or hugetlbfs 2 MiB pages (`memvisor/memory/backend.py`),
- `MemoryRegion.file`: a file mapped MAP_SHARED, read-write or read-only (virtio-pmem),
- `MemoryRegion.anonymous`: MAP_PRIVATE|MAP_ANONYMOUS memory.

A `GuestMemory` holds non-overlapping regions and is the only way the VMM touches guest memory. Every
access is range-checked: a negative address or length, a range wrapping past 2**64, a range outside every
region or spanning two regions, or a write to a read-only region raises `GuestMemoryError`, so a guest can
never steer the VMM to host memory outside its RAM (Python's negative indexes and unbounded integers make
these explicit checks a must).

Giving memory back to the host (`discard`) depends on the backing: a shared mapping keeps its pages in the
memfd or file, so MADV_DONTNEED would only unmap them; the hole must be punched in the file
(fallocate PUNCH_HOLE). Private anonymous memory is freed by MADV_DONTNEED. A region's `page_size` is the
host page it gives memory back in: a discard not aligned to it is refused (on hugetlbfs a hole punched in part
of a 2 MiB page frees nothing, it only zeroes that part). `allocated_bytes` measures what
the host really holds: allocated blocks of the fd, resident pages of a private mapping.

A region may hold ranges nobody may touch (unplugged virtio-mem blocks): its owner makes them PROT_NONE
(`MemoryRegion.protect`), so that neither the guest (KVM_RUN fails with EFAULT) nor the VMM can make the host
back them, and sets `MemoryRegion.accessible`, which every checked access consults: a descriptor, ring or
discard into such a range raises `GuestMemoryError` like any address outside guest RAM.

With MEMVISOR_DISCARD_LOG set, every discard and protect appends a line naming its caller, guest range and
host offset (memvisor/memory/discard_log.py).

Example::

    mem = GuestMemory()
    mem.add(MemoryRegion.memfd(0, 16 << 20, "ram"))
    mem.write_u32(0x1000, 0xDEADBEEF)
    assert mem.read(0x1000, 4) == b"\\xef\\xbe\\xad\\xde"
    mem.discard(0x1000, 0x1000)           # the page reads as zeros again and costs the host nothing
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

from memvisor.errors import GuestFault, HostFailure, MemvisorError, UsageError
from memvisor.memory import discard_log, libc
from memvisor.memory.backend import DEFAULT_BACKEND, MemoryBackend, check_thp, hugepage_shortage_message
from memvisor.memory.libc import PAGE_SIZE

ADDRESS_LIMIT = 1 << 64

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(GuestFault):
    """An access outside guest RAM (or in unplugged memory), wrapping past 2**64, spanning regions, or writing a
    read-only region: the guest named an address it does not own."""


class DiscardError(HostFailure):
    """The host could not give back memory it should have (fallocate or madvise failed)."""


def _check_layout(gpa: int, size: int, name: str, page: int = PAGE_SIZE) -> None:
    if size <= 0 or size % page:
        raise MemvisorError(f"memory region {name!r}: size {size} is not a positive multiple of {page}")
    if gpa < 0 or gpa % page or gpa + size > ADDRESS_LIMIT:
        raise MemvisorError(f"memory region {name!r}: address {gpa:#x} is not aligned to {page} inside 2**64")


class MemoryRegion:
    """One contiguous range of guest physical memory and its host mapping.

    Attributes: `gpa`, `size`, `name`, `readonly`, `host_addr` (the userspace address of the mapping, for
    KVM memslots), `fd` (the memfd or file descriptor backing it, None for private anonymous memory) and
    `view` (a memoryview over the whole mapping, read-only for read-only regions).
    """

    def __init__(self, gpa: int, size: int, name: str, *, readonly: bool, host_addr: int, fd: int | None):
        self.gpa = gpa
        self.size = size
        self.name = name
        self.readonly = readonly
        self.host_addr = host_addr
        self.fd = fd
        self.closed = False
        # The host page size: memory goes back to the host in whole pages of it (2 MiB on hugetlbfs).
        self.page_size = PAGE_SIZE
        self.backend = DEFAULT_BACKEND if fd is not None else None
        # The KVM memslot number, set by the VMM when it registers the region (dirty logging is per slot).
        self.slot: int | None = None
        # (offset, length) -> whether the range may be touched; None: all of it may (see the module docstring).
        self.accessible: Callable[[int, int], bool] | None = None
        # Whether a balloon may give its pages back to the host: RAM yes, a user's file (pmem) never.
        self.balloon_target = fd is None or not readonly
        self.view = libc.memoryview_at(host_addr, size, readonly=readonly)

    @property
    def end(self) -> int:
        """The first GPA after the region."""
        return self.gpa + self.size

    @classmethod
    def memfd(
        cls, gpa: int, size: int, name: str = "ram", backend: MemoryBackend = DEFAULT_BACKEND, *, reserve: bool = True
    ) -> MemoryRegion:
        """RAM in a new memfd of `size` bytes mapped MAP_SHARED (zero-filled), backed as `backend` says
        (memvisor/memory/backend.py). hugetlb memory is reserved from the host's pool when mapped unless
        `reserve` is False (virtio-mem, which allocates its blocks when they are plugged)."""
        _check_layout(gpa, size, name, backend.page_size)
        flags = os.MFD_CLOEXEC
        if backend.kind == "hugetlb":
            flags |= os.MFD_HUGETLB | os.MFD_HUGE_2MB
        elif backend.kind == "thp":
            check_thp()
        try:
            fd = os.memfd_create(f"memvisor-{name}", flags)
        except OSError as err:
            raise MemvisorError(f"cannot create guest RAM {name!r} ({backend.kind}): {err.strerror}") from err
        map_flags = libc.MAP_SHARED
        if not (reserve and backend.kind == "hugetlb"):  # reserved hugetlb memory never SIGBUSes for lack of pages
            map_flags |= libc.MAP_NORESERVE
        try:
            os.ftruncate(fd, size)
            addr = libc.mmap_aligned(size, libc.PROT_READ | libc.PROT_WRITE, map_flags, fd, backend.alignment)
        except OSError as err:
            os.close(fd)
            if backend.kind == "hugetlb" and err.errno == errno.ENOMEM:
                raise UsageError(hugepage_shortage_message(size, f"guest RAM {name!r}")) from err
            raise MemvisorError(f"cannot create {size} bytes of guest RAM {name!r}: {err}; lower the size") from err
        region = cls(gpa, size, name, readonly=False, host_addr=addr, fd=fd)
        region.page_size = backend.page_size
        region.backend = backend
        try:
            if backend.kind == "thp":
                libc.madvise(addr, size, libc.MADV_HUGEPAGE)
            if backend.prealloc:
                libc.madvise(addr, size, libc.MADV_POPULATE_WRITE)
        except OSError as err:
            region.close()
            if backend.kind == "hugetlb" and err.errno in (errno.ENOMEM, errno.EFAULT):
                raise UsageError(hugepage_shortage_message(size, f"guest RAM {name!r}")) from err
            what = "advise huge pages for" if not backend.prealloc else "preallocate"
            raise MemvisorError(f"cannot {what} guest RAM {name!r} ({backend.spec()}): {err.strerror}; "
                                "try without prealloc=on or with --memory-backend 4k") from err
        return region

    @classmethod
    def file(
        cls, gpa: int, path: str | os.PathLike[str], size: int | None = None, *, readonly: bool = False,
        name: str | None = None,
    ) -> MemoryRegion:
        """Map the first `size` bytes of the file at `path` MAP_SHARED (the whole file if `size` is None).

        A writable file shorter than `size` is extended; a read-only one must be long enough, since touching
        a mapping past the end of its file raises SIGBUS.
        """
        name = name or Path(path).name
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as err:
            raise MemvisorError(f"cannot open {str(path)!r} for guest memory {name!r}: {err.strerror}; "
                                "check the path and its permissions") from err
        try:
            length = os.fstat(fd).st_size
            if size is None:
                size = length
            _check_layout(gpa, size, name)
            if length < size:
                if readonly:
                    raise MemvisorError(f"file {str(path)!r} has {length} bytes, fewer than the {size} to map "
                                        "read-only; give a smaller size or a longer file")
                os.ftruncate(fd, size)
            prot = libc.PROT_READ if readonly else libc.PROT_READ | libc.PROT_WRITE
            addr = libc.mmap(size, prot, libc.MAP_SHARED, fd)
        except OSError as err:
            os.close(fd)
            raise MemvisorError(f"cannot map {str(path)!r} as guest memory {name!r}: {err.strerror}") from err
        except BaseException:
            os.close(fd)
            raise
        region = cls(gpa, size, name, readonly=readonly, host_addr=addr, fd=fd)
        region.balloon_target = False  # the user's data: a balloon page there would punch a hole in the file
        return region

    @classmethod
    def anonymous(cls, gpa: int, size: int, name: str = "anon") -> MemoryRegion:
        """Private anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)."""
        _check_layout(gpa, size, name)
        try:
            flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
            addr = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, flags)
        except OSError as err:
            raise MemvisorError(f"cannot map {size} bytes of memory {name!r}: {err}; lower the size") from err
        return cls(gpa, size, name, readonly=False, host_addr=addr, fd=None)

    def protect(self, offset: int, length: int, *, accessible: bool, who: str = "protect") -> None:
        """Make [offset, offset+length) of the mapping inaccessible (PROT_NONE) or read-write again.

        `who` names the caller in the discard log (memvisor/memory/discard_log.py) when one is in force.
        OSError when the kernel refuses (e.g. ENOMEM: too many mappings).
        """
        prot = libc.PROT_NONE
        if accessible:
            prot = libc.PROT_READ if self.readonly else libc.PROT_READ | libc.PROT_WRITE
        log = discard_log.active
        if log is None:
            libc.mprotect(self.host_addr + offset, length, prot)
            return
        self._logged(log, who, "prot-rw" if accessible else "prot-none", offset, length,
                     lambda: libc.mprotect(self.host_addr + offset, length, prot))  # fmt: skip

    def discard(self, offset: int, length: int, who: str = "discard") -> None:
        """Give the host back [offset, offset+length) of this region (page aligned, already checked).

        `who` names the caller in the discard log (memvisor/memory/discard_log.py) when one is in force."""
        log = discard_log.active
        if log is None:
            self._discard(offset, length)
            return
        self._logged(log, who, "punch" if self.fd is not None else "dontneed", offset, length,
                     lambda: self._discard(offset, length))  # fmt: skip

    def _discard(self, offset: int, length: int) -> None:
        if self.fd is not None:
            libc.fallocate(self.fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            libc.madvise(self.host_addr + offset, length, libc.MADV_DONTNEED)

    def _logged(self, log: discard_log.DiscardLog, who: str, op: str, offset: int, length: int,
                action: Callable[[], None]) -> None:  # fmt: skip
        """Run `action` and record it in `log`, failed or not (a failure is re-raised)."""
        start = discard_log.now_ns()
        try:
            action()
        except OSError as err:
            log.record(start, who, op, self.gpa + offset, length, self.name, offset, err.strerror or str(err))
            raise
        log.record(start, who, op, self.gpa + offset, length, self.name, offset)

    def host_page_state(self, offset: int) -> str:
        """Whether the host holds the page at `offset`, without touching it: "hole" or "allocated" in the memfd or
        file (lseek SEEK_DATA), "not resident" or "resident" for private memory (mincore); "" when unknown."""
        offset -= offset % PAGE_SIZE
        if self.closed or not 0 <= offset < self.size:
            return ""
        try:
            if self.fd is None:
                return "resident" if libc.resident_pages(self.host_addr + offset, PAGE_SIZE) else "not resident"
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as err:
            return "hole" if err.errno == errno.ENXIO else ""  # ENXIO: no data from there to the end
        return "allocated" if data == offset else "hole"

    def held_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The (start, end) offsets within [offset, offset+length) where the host may hold pages of the memfd or
        file: everything but its holes (lseek SEEK_DATA/SEEK_HOLE), which read as zeros. All of the range for
        private memory and for a file system without holes (hugetlbfs reports all of a file as data)."""
        end = offset + length
        if self.fd is None:
            return [(offset, end)] if length else []
        ranges: list[tuple[int, int]] = []
        while offset < end:
            try:
                data = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data from there to the end of the file
                    break
                return [*ranges, (offset, end)]
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            ranges.append((data, hole))
            offset = hole
        return ranges

    def allocated_bytes(self) -> int:
        """Bytes the host really holds for this region."""
        if self.closed:
            return 0
        if self.fd is not None:
            return os.fstat(self.fd).st_blocks * 512
        return libc.resident_pages(self.host_addr, self.size) * PAGE_SIZE

    def close(self) -> None:
        """Unmap and close. Views taken earlier must not be used afterwards."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(BufferError):  # something still exports the view; munmap anyway
            self.view.release()
        libc.munmap(self.host_addr, self.size)
        if self.fd is not None:
            os.close(self.fd)

    def __repr__(self) -> str:
        kind = "anon" if self.fd is None else "fd"
        ro = " ro" if self.readonly else ""
        return f"<MemoryRegion {self.name} gpa={self.gpa:#x} size={self.size:#x} {kind}{ro}>"


class GuestMemory:
    """The guest physical address space: non-overlapping regions and checked access to them."""

    # Called with (gpa, length) after every write through `write` (and the write_uN helpers): the dirty tracker
    # (memvisor/vmm/dirty_tracker.py) marks the pages, since KVM logs only the guest's own writes.
    on_write: Callable[[int, int], None] | None = None

    def __init__(self, regions: list[MemoryRegion] | None = None):
        self.regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        for region in regions or []:
            self.add(region)

    def add(self, region: MemoryRegion) -> None:
        """Add `region`; it must not overlap one already present."""
        for other in self.regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise MemvisorError(f"memory region {region.name!r} at {region.gpa:#x} overlaps "
                                    f"{other.name!r} at {other.gpa:#x}; move one of them")
        index = bisect.bisect(self._starts, region.gpa)
        self.regions.insert(index, region)
        self._starts.insert(index, region.gpa)

    def remove(self, region: MemoryRegion) -> None:
        """Take `region` out of the address space (it is not closed)."""
        index = self.regions.index(region)
        del self.regions[index]
        del self._starts[index]

    def _find(self, gpa: int) -> MemoryRegion | None:
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0:
            return None
        region = self.regions[index]
        return region if gpa < region.end else None

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """The region holding all of [gpa, gpa+length) and the offset of gpa in it."""
        if gpa < 0 or length < 0 or gpa + length > ADDRESS_LIMIT:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside the 64-bit address space")
        region = self._find(gpa)
        if region is None or region.closed:
            raise GuestMemoryError(f"guest address {gpa:#x} is not in guest memory")
        if gpa + length > region.end:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} runs past the end of region {region.name!r}")
        offset = gpa - region.gpa
        if region.accessible is not None and not region.accessible(offset, length):
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is in inaccessible (unplugged) memory of "
                                   f"region {region.name!r}")
        return region, offset

    def contains(self, gpa: int, length: int) -> bool:
        """True when [gpa, gpa+length) lies inside one region."""
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def region_at(self, gpa: int) -> MemoryRegion:
        """The region holding `gpa`; GuestMemoryError if none."""
        return self._locate(gpa, 0)[0]

    def host_address(self, gpa: int, length: int) -> int:
        """The host userspace address of the checked range [gpa, gpa+length)."""
        region, offset = self._locate(gpa, length)
        return region.host_addr + offset

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of [gpa, gpa+length) (read-only for a read-only region)."""
        region, offset = self._locate(gpa, length)
        return region.view[offset:offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self._locate(gpa, length)
        return bytes(region.view[offset:offset + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        region, offset = self._locate(gpa, length)
        if region.readonly:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is in read-only region {region.name!r}")
        region.view[offset:offset + length] = data
        hook = self.on_write
        if hook is not None:
            hook(gpa, length)

    def zero(self, gpa: int, length: int) -> None:
        """Make [gpa, gpa+length) read as zeros, writing only where the host holds pages (MemoryRegion.held_ranges):
        a hole, such as all of fresh guest RAM, reads as zeros already, and writing zeros there would only make the
        host allocate it (the kernel's .bss: 23 MiB for Debian's). The `on_write` hook sees all of the range."""
        region, offset = self._locate(gpa, length)
        if region.readonly:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is in read-only region {region.name!r}")
        for start, end in region.held_ranges(offset, length):
            ctypes.memset(region.host_addr + start, 0, end - start)
        hook = self.on_write
        if hook is not None:
            hook(gpa, length)

    def read_u8(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 1)
        return region.view[offset]

    def read_u16(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 2)
        return int(_U16.unpack_from(region.view, offset)[0])

    def read_u32(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 4)
        return int(_U32.unpack_from(region.view, offset)[0])

    def read_u64(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 8)
        return int(_U64.unpack_from(region.view, offset)[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, bytes((value & 0xFF,)))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value & 0xFFFF))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, _U32.pack(value & 0xFFFF_FFFF))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, _U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF))

    def discard(self, gpa: int, length: int, who: str = "discard") -> None:
        """Give the host back the page-aligned range [gpa, gpa+length); it reads as zeros afterwards. `who`
        names the caller in the discard log (memvisor/memory/discard_log.py).

        memfd and file regions get a hole punched (the file shrinks on disk, every mapping of it drops the
        pages); private anonymous regions get MADV_DONTNEED. Read-only regions cannot be discarded
        (GuestMemoryError, like a range outside RAM); a host failure to discard raises DiscardError.
        """
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard of {gpa:#x}+{length:#x} is not aligned to the {PAGE_SIZE}-byte page")
        region, offset = self._locate(gpa, length)
        if offset % region.page_size or length % region.page_size:  # on hugetlbfs a partial punch only zeroes
            raise GuestMemoryError(f"discard of {gpa:#x}+{length:#x} is not aligned to the {region.page_size}-byte "
                                   f"host pages of region {region.name!r}")
        if region.readonly:
            raise GuestMemoryError(f"cannot discard {gpa:#x}+{length:#x}: region {region.name!r} is read-only")
        if length == 0:
            return
        try:
            region.discard(offset, length, who)
        except OSError as err:
            raise DiscardError(f"cannot discard {gpa:#x}+{length:#x} of region {region.name!r}: "
                                   f"{err.strerror}") from err

    def host_page_state(self, gpa: int) -> str:
        """MemoryRegion.host_page_state of the page holding `gpa` ("" outside guest RAM); reads nothing of it."""
        region = self._find(gpa)
        return "" if region is None else region.host_page_state(gpa - region.gpa)

    def allocated_bytes(self, region: MemoryRegion | None = None) -> int:
        """Bytes the host really holds for `region`, or for all regions."""
        if region is not None:
            return region.allocated_bytes()
        return sum(r.allocated_bytes() for r in self.regions)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        """Unmap every region."""
        for region in self.regions:
            region.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
