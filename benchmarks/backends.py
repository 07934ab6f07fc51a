"""`--memory-backend 4k|thp|hugetlb` for the benchmarks that compare memvisor and QEMU: the same host pages behind
guest RAM for both VMMs, and the host set up for them (boot_vs_qemu.py, memory_vs_qemu.py).

- memvisor: `memvisor run --memory-backend KIND` (memvisor/memory/backend.py, docs/HUGEPAGES.md), for boot RAM
  and virtio-mem alike.
- QEMU 7.2: `-object memory-backend-memfd` for 4k and thp (QEMU advises MADV_HUGEPAGE on all its RAM blocks
  itself, so the host's shmem THP setting decides 4 KiB against huge pages), `hugetlb=on,hugetlbsize=2M` for
  hugetlb. virtio-mem's backend on hugetlbfs gets `reserve=off` and the device `prealloc=on`: nothing of the
  sparse region is reserved up front, a plugged block is allocated when plugged (a short pool refuses the plug
  instead of a SIGBUS later), which is what memvisor does on hugetlbfs.
- The host (needs root, as inside the lab): shmem_enabled `never` for 4k and hugetlb (QEMU's advice must not
  give its memfds huge pages), `advise` for thp; for hugetlb, enough 2 MiB pages in the pool. Both are put back
  afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from memvisor.memory.backend import (
    HUGE_PAGE,
    HUGEPAGES_2M,
    THP_SHMEM_CONTROL,
    hugepage_pool,
    thp_shmem_setting,
)

BACKENDS = ("4k", "thp", "hugetlb")
# What QEMU's memory-backend-memfd object gets after its size, for guest RAM.
QEMU_RAM_OPTIONS = {"4k": "", "thp": "", "hugetlb": ",hugetlb=on,hugetlbsize=2M"}
SHMEM_THP = {"4k": "never", "thp": "advise", "hugetlb": "never"}
HUGE_PAGE_MARGIN = 8  # pages beyond guest RAM, per set-up (rounding; nothing else of a VMM is on hugetlbfs)


def memvisor_args(backend: str) -> list[str]:
    """The words of `memvisor run` that choose the backing."""
    return ["--memory-backend", backend]


def qemu_ram_options(backend: str) -> str:
    """Options after `memory-backend-memfd,id=ram,size=...` for guest RAM."""
    return QEMU_RAM_OPTIONS[backend]


def qemu_virtio_mem_options(backend: str) -> tuple[str, str]:
    """(options of virtio-mem's memory-backend-memfd, options of the virtio-mem-pci device) for `backend`."""
    if backend == "hugetlb":
        return QEMU_RAM_OPTIONS[backend] + ",reserve=off", ",prealloc=on"
    return QEMU_RAM_OPTIONS[backend], ""


def huge_pages_for(size: int) -> int:
    """2 MiB pages for `size` bytes of guest memory on hugetlbfs, with the margin."""
    return -(-size // HUGE_PAGE) + HUGE_PAGE_MARGIN


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise SystemExit(f"cannot write {value!r} to {path}: {err.strerror} (the benchmark sets the host's pages for "
                         "--memory-backend: run it as root, e.g. inside the lab)") from None  # fmt: skip


@contextlib.contextmanager
def host_pages(backend: str, hugetlb_bytes: int, *, shmem_control: Path = THP_SHMEM_CONTROL,
               pool_folder: Path = HUGEPAGES_2M) -> Iterator[None]:  # fmt: skip
    """The host set for `backend` while inside: shmem THP per SHMEM_THP and, for hugetlb, a pool with at least
    huge_pages_for(hugetlb_bytes) pages available (all the guest memory that is on hugetlbfs at once). Put back
    as it was on the way out. SystemExit, naming the fix, when the host cannot be set."""
    if backend not in BACKENDS:
        raise SystemExit(f"--memory-backend {backend!r}: give one of {', '.join(BACKENDS)}")
    shmem = thp_shmem_setting(shmem_control)
    if shmem is None and backend == "thp":
        raise SystemExit(
            f"--memory-backend thp: this kernel has no transparent huge pages ({shmem_control} is missing)"
        )
    pool = hugepage_pool(pool_folder) if backend == "hugetlb" else None
    if backend == "hugetlb" and pool is None:
        raise SystemExit(
            f"--memory-backend hugetlb: this kernel has no 2 MiB hugetlbfs pages ({pool_folder} is missing)"
        )
    nr = pool_folder / "nr_hugepages"
    try:
        if shmem is not None and shmem != SHMEM_THP[backend]:
            _write(shmem_control, SHMEM_THP[backend])
        if pool is not None:
            needed = huge_pages_for(hugetlb_bytes)
            _write(nr, str(pool.total + max(needed - pool.available, 0)))
            now = hugepage_pool(pool_folder)
            if now is None or now.available < needed:
                got = now.available if now is not None else 0
                raise SystemExit(f"--memory-backend hugetlb: the host's pool has {got} free 2 MiB pages after asking "
                                 f"for {needed} (memory too fragmented or too small: give the lab more --memory)")  # fmt: skip
        yield
    finally:
        if shmem is not None and thp_shmem_setting(shmem_control) != shmem:
            _write(shmem_control, shmem)
        if pool is not None:
            _write(nr, str(pool.total))
