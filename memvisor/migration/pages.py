"""Reading guest RAM for a live migration from the file behind each region, never through the VMM's mapping.

The VMM's mapping of a region may hold ranges nobody may touch: virtio-mem keeps its unplugged blocks PROT_NONE
(memvisor/devices/mem/device.py), and the plugged state can change under a running pass (a machine reset
unplugs every block, whatever `busy` says). A load through PROT_NONE is a SIGSEGV of the whole VMM, with no
chance to notice first. So the source reads every region with pread(2) on its memfd at the page's offset (the
mapping is MAP_SHARED of that file at offset 0: the same pages). pread cannot fault: a hole (an unplugged block,
a page given back, memory never written) reads as zeros and the kernel does not allocate it (shmem and
hugetlbfs reads of a hole return zeros without adding a page).

Each reader holds its own duplicate of the region's descriptor, so the file stays open under it even if the
region is closed meanwhile (a machine ending while its migration thread still reads): it never reads through
an unmapped view nor through a descriptor number reused for another file.

    reader = RegionReader(region)      # MemvisorError for a region without a file
    backed = reader.data_mask()        # bool per page: the host holds data there (SEEK_DATA)
    reader.read(offset, buffer)        # fill `buffer` (whole pages) from `offset` of the region
    reader.close()
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from memvisor.errors import MemvisorError
from memvisor.migration.stream import PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np

    from memvisor.memory.guest_memory import MemoryRegion


def data_mask(fd: int, size: int) -> np.ndarray:
    """Bool per page of the first `size` bytes of file `fd`: True where the host holds data (SEEK_DATA/SEEK_HOLE)."""
    import numpy as np

    mask = np.zeros(size // PAGE_SIZE, dtype=bool)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.EINVAL:  # a file system that cannot tell: all of it may hold data
                mask[offset // PAGE_SIZE :] = True
            elif error.errno != errno.ENXIO:  # ENXIO: no data past offset
                raise
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        mask[start // PAGE_SIZE : -(-end // PAGE_SIZE)] = True
        offset = end
    return mask


class RegionReader:
    """Reads one region's pages from its own duplicate of the region's file descriptor."""

    def __init__(self, region: MemoryRegion) -> None:
        if region.fd is None:
            raise MemvisorError(f"guest memory region {region.name!r} has no file behind it: live migration reads "
                                "guest RAM from its memfd, so give the machine memfd-backed memory")  # fmt: skip
        self.name, self.size = region.name, region.size
        self.fd = os.dup(region.fd)

    def data_mask(self) -> np.ndarray:
        return data_mask(self.fd, self.size)

    def read(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the region's bytes from `offset` (page aligned, inside the region)."""
        length = len(buffer)
        if offset < 0 or offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > self.size:
            raise ValueError(f"{self.name}: {offset:#x}+{length:#x} is not whole pages inside the region")
        done = 0
        while done < length:
            count = os.preadv(self.fd, [buffer[done:]], offset + done)
            if count == 0:  # the file is shorter than the region: nobody truncates a memfd the VMM maps
                raise MemvisorError(f"guest memory region {self.name!r} ended at {offset + done:#x} while the "
                                    "migration read it")  # fmt: skip
            done += count

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
