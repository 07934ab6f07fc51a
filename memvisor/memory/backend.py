"""How guest RAM is backed on the host: 4 KiB pages, transparent huge pages, or hugetlbfs 2 MiB pages.

    memvisor run --memory 1G --memory-backend thp                 memfd + madvise(MADV_HUGEPAGE)
    memvisor run --memory 1G --memory-backend hugetlb,prealloc=on memfd(MFD_HUGETLB | MFD_HUGE_2MB), all up front

- `4k` (the default): a memfd of 4 KiB pages, allocated on first touch.
- `thp`: the same memfd, mapped at a 2 MiB aligned address and advised MADV_HUGEPAGE, so the kernel backs it
  with 2 MiB transparent huge pages where it can. Shared memory (a memfd is shmem) gets THP only when
  /sys/kernel/mm/transparent_hugepage/shmem_enabled allows it (`advise`, `within_size`, `always` or
  `force`); `never` or `deny` is refused, naming the fix. Discards stay exact at 4 KiB: the kernel splits a
  huge page when a hole is punched in part of it (QEMU treats THP-backed RAM the same way).
- `hugetlb`: a memfd of 2 MiB hugetlbfs pages from the host's reserved pool (HugePages_* in /proc/meminfo,
  sized by /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages, which is /proc/sys/vm/nr_hugepages when
  2 MiB is the default huge page size). Boot RAM is reserved when it is mapped, so a short pool is an error
  at start (naming the number of pages needed), never a SIGBUS later; `prealloc=on` also allocates every page
  at start. Sizes and addresses must be 2 MiB multiples, and memory goes back to the pool only in whole 2 MiB
  pages (a hole punched in part of a hugetlbfs page only zeroes it): `MemoryRegion.page_size` says so to the
  devices that discard (balloon, virtio-mem).

`prealloc=on` works for every kind: MADV_POPULATE_WRITE faults the whole mapping in at start (through the
mapping, so THP applies to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memvisor.errors import UsageError

BackendKind = Literal["4k", "thp", "hugetlb"]
KINDS: tuple[BackendKind, ...] = ("4k", "thp", "hugetlb")
SMALL_PAGE = 4096
HUGE_PAGE = 2 << 20
THP_SHMEM_CONTROL = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
DEFAULT_HUGEPAGE_SYSCTL = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")
# shmem_enabled values under which a MADV_HUGEPAGE mapping of a memfd gets huge pages.
THP_SHMEM_ON = ("advise", "within_size", "always", "force")


@dataclass(frozen=True)
class MemoryBackend:
    """The backing of guest RAM: its kind and whether every page is allocated at start."""

    kind: BackendKind = "4k"
    prealloc: bool = False

    @property
    def page_size(self) -> int:
        """The host page size guest RAM can be given back in: 2 MiB for hugetlb, else 4 KiB."""
        return HUGE_PAGE if self.kind == "hugetlb" else SMALL_PAGE

    @property
    def alignment(self) -> int:
        """How guest RAM's host mapping is aligned: 2 MiB for huge pages (KVM maps 2 MiB only if aligned)."""
        return SMALL_PAGE if self.kind == "4k" else HUGE_PAGE

    def spec(self) -> str:
        return self.kind + (",prealloc=on" if self.prealloc else "")


DEFAULT_BACKEND = MemoryBackend()


def parse_memory_backend(text: str) -> MemoryBackend:
    """Parse `--memory-backend KIND[,prealloc=on|off]` (KIND: 4k, thp or hugetlb)."""
    kind, *options = [part.strip() for part in text.split(",")]
    if kind not in KINDS:
        raise UsageError(f"--memory-backend {text!r}: the kind {kind!r} is not one of {', '.join(KINDS)}; "
                         "e.g. --memory-backend hugetlb,prealloc=on")
    prealloc = False
    for option in options:
        name, _, value = option.partition("=")
        if name != "prealloc":
            raise UsageError(f"--memory-backend {text!r}: unknown option {name!r}; the only option is prealloc=on|off")
        if value not in ("on", "off"):
            raise UsageError(f"--memory-backend {text!r}: prealloc={value!r} is not on or off")
        prealloc = value == "on"
    return MemoryBackend(kind, prealloc)  # type: ignore[arg-type]  # kind checked against KINDS above


def thp_shmem_setting(control: Path = THP_SHMEM_CONTROL) -> str | None:
    """The bracketed choice in shmem_enabled ("advise", "never", ...), None if the kernel has no THP."""
    try:
        text = control.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def check_thp(control: Path = THP_SHMEM_CONTROL) -> None:
    """UsageError unless shared memory may get transparent huge pages through MADV_HUGEPAGE."""
    setting = thp_shmem_setting(control)
    if setting is None:
        raise UsageError(f"--memory-backend thp: this kernel has no transparent huge pages ({control} is missing); "
                         "use --memory-backend 4k or hugetlb")
    if setting not in THP_SHMEM_ON:
        raise UsageError(f"--memory-backend thp: transparent huge pages are off for shared memory ({control} is "
                         f"[{setting}]); as root: echo advise > {control}")


@dataclass(frozen=True)
class HugePagePool:
    """The host's 2 MiB hugetlbfs pool: pages in it, free, and free but promised to a mapping already."""

    total: int
    free: int
    reserved: int

    @property
    def available(self) -> int:
        return max(self.free - self.reserved, 0)


def hugepage_pool(folder: Path = HUGEPAGES_2M) -> HugePagePool | None:
    """The 2 MiB pool from sysfs; None when the kernel has no 2 MiB hugetlbfs pages."""
    try:
        return HugePagePool(*(int((folder / name).read_text()) for name in
                              ("nr_hugepages", "free_hugepages", "resv_hugepages")))
    except (OSError, ValueError):
        return None


def default_hugepage_size(meminfo: Path = MEMINFO) -> int | None:
    """Hugepagesize from /proc/meminfo in bytes (the size /proc/sys/vm/nr_hugepages counts)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def hugepage_shortage_message(size: int, what: str, pool: HugePagePool | None = None) -> str:
    """Why `size` bytes of hugetlbfs memory could not be had, and the command that reserves enough."""
    pool = pool if pool is not None else hugepage_pool()
    needed = -(-size // HUGE_PAGE)
    if pool is None:
        return (f"{what}: this host has no 2 MiB hugetlbfs pages ({HUGEPAGES_2M} is missing); "
                "use --memory-backend thp or 4k")
    control = DEFAULT_HUGEPAGE_SYSCTL if default_hugepage_size() == HUGE_PAGE else HUGEPAGES_2M / "nr_hugepages"
    target = pool.total + max(needed - pool.available, 0)
    return (f"{what} needs {needed} free 2 MiB huge pages and the host has {pool.available} "
            f"({pool.total} reserved in all, {pool.free - pool.available} of the free ones promised to others); "
            f"as root: echo {target} > {control}")
