"""Numbers and binary layouts of the virtio-balloon device (virtio 1.2 section 5.5, Linux uapi virtio_balloon.h).

Everything a reader needs to decode a balloon buffer or the configuration space by hand is here: feature
bits, the queue order, the config layout, the stat entry layout and the names of the statistics.
"""

from __future__ import annotations

import enum
import struct

# Feature bits, virtio 1.2 section 5.5.3.
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0  # the driver tells the host before it reuses deflated pages
VIRTIO_BALLOON_F_STATS_VQ = 1  # a statistics queue is present
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2  # the driver deflates when the guest runs out of memory
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3  # a free page hinting queue is present (used by live migration)
VIRTIO_BALLOON_F_PAGE_POISON = 4  # the driver writes its page poison value to poison_val
VIRTIO_BALLOON_F_REPORTING = 5  # a free page reporting queue is present

FEATURE_NAMES = {
    VIRTIO_BALLOON_F_MUST_TELL_HOST: "must-tell-host",
    VIRTIO_BALLOON_F_STATS_VQ: "stats-vq",
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM: "deflate-on-oom",
    VIRTIO_BALLOON_F_FREE_PAGE_HINT: "free-page-hint",
    VIRTIO_BALLOON_F_PAGE_POISON: "page-poison",
    VIRTIO_BALLOON_F_REPORTING: "free-page-reporting",
}

# Balloon pages are always 4 KiB, whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT).
BALLOON_PAGE_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << BALLOON_PAGE_SHIFT

# One inflate or deflate buffer: le32 page frame numbers, virtio 1.2 section 5.5.6.
PFN = struct.Struct("<I")
# Linux sends at most VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) PFNs per buffer; the device reads no more.
MAX_PFNS_PER_BUFFER = 256

# struct virtio_balloon_config, virtio 1.2 section 5.5.4 (all fields little endian, also for legacy).
CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
CONFIG_SIZE = CONFIG.size
CONFIG_NUM_PAGES = 0
CONFIG_ACTUAL = 4
CONFIG_FREE_PAGE_HINT_CMD_ID = 8
CONFIG_POISON_VAL = 12
# The fields the driver may write; the others are read-only for it.
DRIVER_WRITABLE_FIELDS = (CONFIG_ACTUAL, CONFIG_POISON_VAL)

# Free page hint command ids, virtio 1.2 section 5.5.6.4 (VIRTIO_BALLOON_CMD_ID_STOP / _DONE).
CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_FIRST = 2  # host-chosen ids start here and wrap back to it after 2**32 - 1
CMD_ID = struct.Struct("<I")

# struct virtio_balloon_stat, virtio 1.2 section 5.5.6.3: packed le16 tag, le64 value (10 bytes).
STAT = struct.Struct("<HQ")

# Statistic tags 0-15 (VIRTIO_BALLOON_S_*) and the names QEMU's `guest-stats` property gives them.
# Linux 6.1 sends tags 0-9; tags 10-15 (OOM kills and reclaim activity) came with Linux 6.12.
STAT_NAMES: tuple[str, ...] = (
    "stat-swap-in",  # 0 SWAP_IN: memory swapped in (bytes)
    "stat-swap-out",  # 1 SWAP_OUT: memory swapped out (bytes)
    "stat-major-faults",  # 2 MAJFLT
    "stat-minor-faults",  # 3 MINFLT
    "stat-free-memory",  # 4 MEMFREE (bytes)
    "stat-total-memory",  # 5 MEMTOT (bytes)
    "stat-available-memory",  # 6 AVAIL: MemAvailable (bytes)
    "stat-disk-caches",  # 7 CACHES (bytes)
    "stat-htlb-pgalloc",  # 8 HTLB_PGALLOC: hugetlb page allocations
    "stat-htlb-pgfail",  # 9 HTLB_PGFAIL: hugetlb page allocation failures
    "stat-oom-kills",  # 10 OOM_KILL
    "stat-alloc-stalls",  # 11 ALLOC_STALL
    "stat-async-scans",  # 12 ASYNC_SCAN
    "stat-direct-scans",  # 13 DIRECT_SCAN
    "stat-async-reclaims",  # 14 ASYNC_RECLAIM
    "stat-direct-reclaims",  # 15 DIRECT_RECLAIM
)
STAT_COUNT = len(STAT_NAMES)
# QEMU reports a statistic the guest never sent as -1.
STAT_UNSET = -1
# The device reads at most this much of a stats buffer (Linux sends 10 bytes per statistic, <= 160).
MAX_STATS_BYTES = 4096

# Every queue is offered with this many entries; free page reporting needs at least 32 (Linux
# PAGE_REPORTING_CAPACITY: one chain of up to 32 descriptors, no indirect descriptors).
QUEUE_SIZE = 128
REPORTING_MIN_QUEUE_SIZE = 32


class QueueRole(enum.Enum):
    """What a balloon queue carries. Queue indexes after deflate count only the negotiated features."""

    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE = "free_page"
    REPORTING = "reporting"


# The optional queues in index order, with the feature that brings each (virtio 1.2 section 5.5.2).
OPTIONAL_QUEUES: tuple[tuple[QueueRole, int], ...] = (
    (QueueRole.STATS, VIRTIO_BALLOON_F_STATS_VQ),
    (QueueRole.FREE_PAGE, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
    (QueueRole.REPORTING, VIRTIO_BALLOON_F_REPORTING),
)


def queue_roles(features: int) -> list[QueueRole]:
    """The role of each queue index for the feature bits `features` (offered or negotiated)."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    roles += [role for role, bit in OPTIONAL_QUEUES if features >> bit & 1]
    return roles
