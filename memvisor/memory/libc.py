"""The few libc calls guest memory needs, through ctypes (x86-64 Linux, glibc).

`mmap` is called directly rather than through Python's `mmap` module because that module gives no address
for a read-only mapping, and KVM memslots need the userspace address of every mapping. Every wrapper
raises `OSError` with the C errno on failure, like the `os` module does.
"""

import ctypes
import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# <sys/mman.h>
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14
# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# glibc by its soname: ctypes.util.find_library("c") would run `ldconfig -p` in a subprocess at every start.
# The one handle in memvisor (memvisor/kvm/ioctls.py calls ioctl through it too).
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)

_mmap = LIBC.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = LIBC.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mprotect = LIBC.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise = LIBC.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mincore = LIBC.mincore
_mincore.restype = ctypes.c_int
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_fallocate = LIBC.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# PyMemoryView_FromMemory gives a plain byte-format ('B') memoryview over raw memory, which slices,
# compares and assigns like any bytes buffer (a view of a ctypes array would carry the format '<c').
_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_from_memory.restype = ctypes.py_object
_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PYBUF_READ = 0x100
_PYBUF_WRITE = 0x200


def _raise_errno(call: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}")


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """Map `length` bytes; return the address."""
    addr = _mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        _raise_errno("mmap")
    assert addr is not None
    return int(addr)


def mmap_aligned(length: int, prot: int, flags: int, fd: int, alignment: int) -> int:
    """Map `length` bytes of `fd` at an address that is a multiple of `alignment` (a power of two).

    A huge page can back a mapping only where the address is aligned to it: reserve `length + alignment`
    bytes of nothing (PROT_NONE), map the file over the aligned part (MAP_FIXED), unmap the rest."""
    if alignment <= PAGE_SIZE:
        return mmap(length, prot, flags, fd)
    span = length + alignment
    base = mmap(span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
    start = (base + alignment - 1) & ~(alignment - 1)
    try:
        addr = _mmap(start, length, prot, flags | MAP_FIXED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            _raise_errno("mmap")
    except OSError:
        munmap(base, span)
        raise
    if start > base:
        munmap(base, start - base)
    if base + span > start + length:
        munmap(start + length, base + span - start - length)
    return start


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        _raise_errno("munmap")


def mprotect(addr: int, length: int, prot: int) -> None:
    if _mprotect(addr, length, prot) != 0:
        _raise_errno("mprotect")


def madvise(addr: int, length: int, advice: int) -> None:
    if _madvise(addr, length, advice) != 0:
        _raise_errno("madvise")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        _raise_errno("fallocate")


def resident_pages(addr: int, length: int) -> int:
    """How many pages of the page-aligned range [addr, addr+length) are resident (mincore)."""
    pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    if _mincore(addr, length, vec) != 0:
        _raise_errno("mincore")
    # Only bit 0 of each byte is defined; the others are reserved.
    return bytes(vec).translate(_LOW_BIT).count(1)


_LOW_BIT = bytes(i & 1 for i in range(256))


def memoryview_at(addr: int, length: int, *, readonly: bool) -> memoryview:
    """A byte memoryview of `length` bytes at `addr`. It must not be used after the memory is unmapped."""
    view: memoryview = _from_memory(addr, length, _PYBUF_READ if readonly else _PYBUF_WRITE)
    return view
