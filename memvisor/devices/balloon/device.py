"""The virtio-balloon device model (device id 5, virtio 1.2 section 5.5).

The host asks the guest to give memory back by raising `num_pages` in the configuration space (a config
interrupt tells the driver); the driver allocates that many 4 KiB pages, sends their page frame numbers on
the inflate queue and writes how many it holds to `actual`. The device punches the backing of those pages
out of the host (they read as zeros if the guest touches them again) and records them; deflate buffers give
pages back to the guest, whose memory returns on first touch. Queues, in index order (the optional ones
exist only when their feature is negotiated, and count only those):

    0 inflate, 1 deflate, [stats (STATS_VQ)], [free page hints (FREE_PAGE_HINT)], [reporting (REPORTING)]

- stats: the driver's one buffer of (tag, value) pairs is held until the host wants fresh numbers
  (`request_stats()`, or `poll_stats()` every `stats_polling_interval` seconds); see `stats.py`.
- free page hints: command-id rounds for live migration (`start_hinting`, `stop_hinting`, `done_hinting`,
  `hinted_pages`, `clear_hinted`); see `hinting.py`.
- free page reporting: the guest names free blocks (>= 2 MiB) it will not touch until it allocates them
  again; the device discards them, unless the guest poisons free pages with a non-zero value (PAGE_POISON):
  a discarded page reads as zeros, which would break the poison check.
- guest RAM on host pages bigger than 4 KiB (`--memory-backend hugetlb`: 2 MiB): an inflated page goes back to
  the host only with the other 511 of its host page (the bitmap of inflated pages tells when all are in);
  a partly inflated host page stays whole, deflate and reset only clear bits (nothing of a partial page was
  given back); a reported range gives back the whole host pages inside it.

Guest input is hostile and never raises out of the device for a bad buffer: write-only or odd-length
inflate buffers, more than 256 PFNs (the rest is ignored), PFNs outside guest RAM (ignored, counted in
`errors`), oversized or repeated stats buffers, unknown stat tags, hints or reports outside RAM are all
completed, and so is a malformed chain (a descriptor loop, a buffer outside guest RAM: answered with
nothing done). Only a broken ring (an available index running ahead, a head out of range, a used ring that
cannot be written: no head can be returned) raises `BalloonError`, which makes the transport set
DEVICE_NEEDS_RESET. Work per notification is bounded by
the queue size; nothing outside the balloon's RAM regions (writable regions by default) is discarded.

Statistics polling needs a clock: the VMM's event loop calls `poll_stats()` (and can sleep
`stats_deadline()` seconds until the next one), or the device runs a `threading.Timer` of its own when
built with `stats_timer=True`; `reset()` and `close()` cancel it.

Example (the control plane's view)::

    balloon = BalloonDevice(ram_size=1 << 30, free_page_reporting=True, on_change=emit_balloon_change)
    balloon.set_target(512 << 20)     # QMP `balloon`: guest RAM should shrink to 512 MiB
    balloon.actual_bytes()            # what the guest has given back so far
    balloon.guest_stats()             # QMP qom-get guest-stats
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from memvisor.devices.balloon.constants import (
    BALLOON_PAGE_SHIFT,
    BALLOON_PAGE_SIZE,
    CMD_ID,
    CONFIG,
    CONFIG_SIZE,
    MAX_PFNS_PER_BUFFER,
    MAX_STATS_BYTES,
    PFN,
    QUEUE_SIZE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    QueueRole,
    queue_roles,
)
from memvisor.devices.balloon.hinting import FreePageHinting, HintState
from memvisor.devices.balloon.pages import BalloonRam, PageBitmap, RegionFilter, writable_region
from memvisor.devices.balloon.stats import BalloonStats
from memvisor.errors import UsageError
from memvisor.memory import discard_log
from memvisor.memory.guest_memory import DiscardError, GuestMemory, GuestMemoryError
from memvisor.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
    VirtioDevice,
    VirtioDeviceError,
    has_feature,
)
from memvisor.virtio.queue import DescriptorChain, SplitVirtqueue, VirtqueueError

if TYPE_CHECKING:
    import numpy as np  # hinted_pages and dirty masks only; numpy is never imported at start-up

log = logging.getLogger(__name__)

COUNTER_NAMES = (
    "inflate_requests",  # inflate buffers completed
    "deflate_requests",  # deflate buffers completed
    "pages_inflated",  # distinct valid pages named per inflate buffer
    "pages_deflated",  # distinct valid pages named per deflate buffer
    "report_requests",  # free page reporting batches completed
    "pages_reported",  # 4 KiB pages named by reports
    "bytes_discarded",  # bytes given back to the host (inflate and reporting)
    "hint_pages",  # pages newly recorded as hinted
    "hints_ignored",  # hint buffers outside an active round
    "stats_updates",  # stats buffers received
    "stats_requests",  # stats buffers returned to the driver to refill
    "stats_unknown_tags",  # stat entries with a tag above 15 (ignored)
    "errors",  # malformed buffers and PFNs or ranges outside RAM, all completed (guest faults)
    "pages_ignored",  # pages named in unplugged virtio-mem blocks: nothing done (guest faults)
    "discard_failures",  # the host could not discard pages it should have (host failures, logged)
)

ChangeListener = Callable[[int], None]


class BalloonError(VirtioDeviceError):
    """The balloon cannot go on (a malformed virtqueue): the transport marks it DEVICE_NEEDS_RESET."""


class BalloonDevice(VirtioDevice):
    """virtio-balloon: inflate/deflate, statistics, free page hinting and free page reporting.

    `ram_size` is the guest RAM the balloon takes from (the base of `set_target` and of the sizes reported).
    Feature options are offered as given; the device acts on what the driver negotiated. `on_change` is
    called (outside the device lock) with the guest's memory size in bytes, ram_size minus the balloon, each
    time the driver writes a new `actual`: the `actual` of QMP's BALLOON_CHANGE event. `region_filter`
    chooses the guest memory regions the balloon may discard (default: writable RAM, boot or virtio-mem, never a
    pmem file); pages in unplugged virtio-mem blocks are ignored and counted (`pages_ignored`). `hint_filter`
    (default: the same) chooses where free page hints may point: only memory the dirty log covers.
    """

    device_id = VIRTIO_ID_BALLOON

    def __init__(
        self,
        ram_size: int,
        *,
        stats: bool = True,
        stats_polling_interval: float = 0,
        stats_timer: bool = False,
        deflate_on_oom: bool = False,
        free_page_hint: bool = False,
        free_page_reporting: bool = False,
        page_poison: bool = True,
        must_tell_host: bool = False,
        on_change: ChangeListener | None = None,
        region_filter: RegionFilter = writable_region,
        hint_filter: RegionFilter | None = None,
    ):
        super().__init__()
        if ram_size <= 0 or ram_size % BALLOON_PAGE_SIZE:
            raise UsageError(f"balloon: RAM size {ram_size} is not a positive multiple of 4 KiB; fix the memory size")
        if stats_polling_interval < 0:
            raise UsageError("balloon: the stats polling interval must be 0 (off) or a positive number of seconds")
        self.ram_size = ram_size
        self._offered = 1 << VIRTIO_F_VERSION_1
        for enabled, bit in (
            (must_tell_host, VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (stats, VIRTIO_BALLOON_F_STATS_VQ),
            (deflate_on_oom, VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            (free_page_hint, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            (page_poison, VIRTIO_BALLOON_F_PAGE_POISON),
            (free_page_reporting, VIRTIO_BALLOON_F_REPORTING),
        ):
            if enabled:
                self._offered |= 1 << bit
        self.queue_max_sizes = (QUEUE_SIZE,) * len(queue_roles(self._offered))
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.region_filter = region_filter
        self.hint_filter = hint_filter or region_filter
        self._listeners: list[ChangeListener] = [on_change] if on_change else []
        # Configuration space (num_pages is the host's wish, actual and poison_val are the driver's).
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.stats = BalloonStats()
        self.hinting = FreePageHinting()
        # State of an activated device.
        self._memory: GuestMemory | None = None
        self._features = 0
        self._queues: dict[QueueRole, SplitVirtqueue] = {}
        self._roles: dict[int, QueueRole] = {}
        self._ram: BalloonRam | None = None
        self._guarded: list[tuple[int, int]] = []
        self._inflated = PageBitmap(0)
        self._stats_head: int | None = None
        # Statistics polling.
        self._stats_interval = float(stats_polling_interval)
        self._next_stats_at: float | None = None
        self._use_timer = stats_timer
        self._timer: threading.Timer | None = None

    # --- the virtio device contract -----------------------------------------------------------------------

    def device_features(self) -> int:
        return self._offered

    def read_config(self, offset: int, length: int) -> bytes:
        with self.lock:
            config = self._config_bytes()
        if offset < 0 or length <= 0:
            return bytes(max(length, 0))
        return config[offset:offset + length].ljust(length, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes `actual` (and `poison_val`); writes to the other fields are ignored."""
        if offset < 0 or offset >= CONFIG_SIZE or not data:
            return
        with self.lock:
            config = bytearray(self._config_bytes())
            end = min(offset + len(data), CONFIG_SIZE)
            config[offset:end] = data[:end - offset]
            _, actual, _, poison_val = CONFIG.unpack(config)
            self.poison_val = poison_val
            changed = actual != self.actual
            self.actual = actual
        if changed:
            self._emit_change()

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        with self.lock:
            self._memory = memory
            self._features = features & self._offered
            self._queues = {}
            self._roles = {}
            for index, role in enumerate(queue_roles(self._features)):
                if index < len(queues) and queues[index].ready:
                    self._queues[role] = queues[index]
                    self._roles[index] = role
            self._ram = BalloonRam(memory, self.region_filter)
            # PFN spans of regions with holes the guest may not touch (virtio-mem): only runs there are checked.
            self._guarded = [(r.gpa >> BALLOON_PAGE_SHIFT, r.end >> BALLOON_PAGE_SHIFT) for r in memory.regions
                             if r.accessible is not None]
            self._inflated = PageBitmap(self._ram.pfn_limit)
            self.hinting.attach(BalloonRam(memory, self.hint_filter))
            self._stats_head = None
            self._next_stats_at = time.monotonic() + self._stats_interval if self._stats_interval else None
            self._arm_timer()
        # Linux puts its first stats buffer on the queue (and kicks) before DRIVER_OK: take it now.
        for index in sorted(self._roles):
            self.notify(index)

    def notify(self, queue_index: int) -> None:
        with self.lock:
            role = self._roles.get(queue_index)
            if role is None or self._memory is None:
                return
            queue = self._queues[role]
            handler = {
                QueueRole.INFLATE: self._inflate,
                QueueRole.DEFLATE: self._deflate,
                QueueRole.STATS: self._receive_stats,
                QueueRole.FREE_PAGE: self._receive_hints,
                QueueRole.REPORTING: self._receive_report,
            }[role]
            self._drain(queue, handler)

    def reset(self) -> None:
        """The driver reset the device: the guest forgets its balloon, so does the device (num_pages stays)."""
        with self.lock:
            self._cancel_timer()
            self._memory = None
            self._features = 0
            self._queues = {}
            self._roles = {}
            self._ram = None
            self._inflated = PageBitmap(0)
            self._stats_head = None
            self._next_stats_at = None
            self.hinting.reset()
            self.poison_val = 0
            changed = self.actual != 0
            self.actual = 0
        if changed:
            self._emit_change()

    def close(self) -> None:
        """Stop the stats timer, if any (the VMM is shutting down)."""
        with self.lock:
            self._cancel_timer()

    # --- host API: size -----------------------------------------------------------------------------------

    def set_target(self, target_bytes: int) -> None:
        """Ask the guest to shrink (or grow back) to `target_bytes` of RAM, as QMP `balloon` does.

        A target above the RAM size means an empty balloon; the balloon size is rounded down to 4 KiB pages.
        """
        if target_bytes <= 0:
            raise UsageError(f"balloon target {target_bytes} must be a positive size; give the guest RAM size to keep")
        target = min(target_bytes, self.ram_size)
        self.set_num_pages((self.ram_size - target) >> BALLOON_PAGE_SHIFT)

    def set_num_pages(self, pages: int) -> None:
        """Ask the guest to hold `pages` 4 KiB pages in its balloon; raises a config interrupt."""
        limit = min(self.ram_size >> BALLOON_PAGE_SHIFT, 0xFFFF_FFFF)
        if not 0 <= pages <= limit:
            raise UsageError(f"balloon size {pages} pages is outside 0..{limit}; give a size within guest RAM")
        with self.lock:  # the generation moves with the value, before any config read can see it
            self.num_pages = pages
            self.signal_config_change()

    def target_bytes(self) -> int:
        """The guest RAM size the host asked for."""
        return self.ram_size - (self.num_pages << BALLOON_PAGE_SHIFT)

    def actual_bytes(self) -> int:
        """The balloon's size as the driver last reported it (`actual` pages of 4 KiB)."""
        return self.actual << BALLOON_PAGE_SHIFT

    def guest_memory_bytes(self) -> int:
        """The guest's memory size now: RAM minus the balloon (QMP query-balloon `actual`)."""
        return max(self.ram_size - self.actual_bytes(), 0)

    def inflated_pages(self) -> int:
        """How many distinct pages the device holds as inflated (from the inflate/deflate buffers)."""
        with self.lock:
            return self._inflated.count()

    def inflated_ranges(self) -> list[tuple[int, int]]:
        """The inflated memory as (guest physical address, length) ranges (migration need not send it)."""
        with self.lock:
            return [(first << BALLOON_PAGE_SHIFT, count << BALLOON_PAGE_SHIFT)
                    for first, count in self._inflated.ranges()]

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call `listener(guest_memory_bytes)` each time the driver changes `actual`."""
        self._listeners.append(listener)

    @property
    def negotiated_features(self) -> int:
        return self._features

    @property
    def poison_active(self) -> bool:
        """PAGE_POISON was negotiated and the guest's poison value is not zero: free pages must keep it."""
        return has_feature(self._features, VIRTIO_BALLOON_F_PAGE_POISON) and self.poison_val != 0

    # --- snapshot (memvisor/devices/balloon/state.py) ----------------------------------------------------

    @property
    def held_stats_head(self) -> int | None:
        """The head of the stats buffer the device holds until its next request, None when it holds none."""
        return self._stats_head

    @property
    def inflated_bitmap(self) -> PageBitmap:
        """The inflated pages, one bit per guest PFN of the RAM the balloon covers (empty before activation)."""
        return self._inflated

    def queue_indexes(self) -> list[int]:
        """The indexes of the queues the driver activated, in order."""
        with self.lock:
            return sorted(self._roles)

    def stop_stats_timer(self) -> None:
        """Cancel the stats timer (a snapshot quiesces the device); `start_stats_timer` arms it again."""
        with self.lock:
            self._cancel_timer()

    def start_stats_timer(self) -> None:
        """Arm the stats timer for one polling interval, unless it is armed already."""
        with self.lock:
            if self._timer is None:
                self._arm_timer()

    def load_stats_holding(self, polling_interval: float, stats_head: int | None) -> None:
        """A snapshot's polling interval and held stats buffer (a restore; the caller checked that the head is in
        flight on the stats queue); the stats timer starts again from a whole interval."""
        with self.lock:
            self._stats_interval = polling_interval
            self._stats_head = stats_head
            self._cancel_timer()
            self._arm_timer()

    # --- host API: statistics -----------------------------------------------------------------------------

    @property
    def stats_polling_interval(self) -> float:
        return self._stats_interval

    def set_stats_polling_interval(self, seconds: float) -> None:
        """QOM guest-stats-polling-interval: 0 stops polling; otherwise the first request goes out at once."""
        if seconds < 0:
            raise UsageError("balloon: the stats polling interval must be 0 (off) or a positive number of seconds")
        with self.lock:
            self._stats_interval = float(seconds)
            self._next_stats_at = time.monotonic() if seconds else None
            self._cancel_timer()
            self._arm_timer(delay=0.0)

    def guest_stats(self) -> dict[str, object]:
        """QOM guest-stats: {"stats": {"stat-swap-in": ..., ...}, "last-update": seconds} (-1 = unset)."""
        with self.lock:
            return self.stats.as_guest_stats()

    def request_stats(self) -> bool:
        """Return the held stats buffer so the driver refills it now; False if the device holds none."""
        with self.lock:
            return self._return_stats_buffer()

    def poll_stats(self, now: float | None = None) -> bool:
        """Call from the event loop: request stats if polling is on and the interval has passed."""
        with self.lock:
            if not self._stats_interval or QueueRole.STATS not in self._queues:
                return False
            now = time.monotonic() if now is None else now
            if self._next_stats_at is not None and now < self._next_stats_at:
                return False
            self._next_stats_at = now + self._stats_interval
            return self._return_stats_buffer()

    def stats_deadline(self, now: float | None = None) -> float | None:
        """Seconds until `poll_stats` has work (0 if due), None when polling is off or no queue."""
        with self.lock:
            if not self._stats_interval or QueueRole.STATS not in self._queues or self._next_stats_at is None:
                return None
            now = time.monotonic() if now is None else now
            return max(self._next_stats_at - now, 0.0)

    # --- host API: free page hinting ----------------------------------------------------------------------

    def start_hinting(self) -> int:
        """Start a hinting round (live migration begins): return its command id (>= 2)."""
        with self.lock:
            self._require_feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT, "free page hinting", "free_page_hint")
            cmd_id = self.hinting.start()
            self.signal_config_change()
        return cmd_id

    def stop_hinting(self) -> None:
        """Tell the guest to stop hinting (config cmd id STOP); hints recorded so far stay."""
        with self.lock:
            self._require_feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT, "free page hinting", "free_page_hint")
            self.hinting.stop()
            self.signal_config_change()

    def done_hinting(self) -> None:
        """Tell the guest it may reuse the hinted pages (config cmd id DONE)."""
        with self.lock:
            self._require_feature(VIRTIO_BALLOON_F_FREE_PAGE_HINT, "free page hinting", "free_page_hint")
            self.hinting.done()
            self.signal_config_change()

    @property
    def hint_state(self) -> HintState:
        return self.hinting.state

    def hinted_pages(self) -> np.ndarray:
        """A bool array indexed by PFN: True for pages hinted free in the current round."""
        with self.lock:
            return self.hinting.hinted_pages()

    def hinted_ranges(self) -> list[tuple[int, int]]:
        """The hinted pages as (guest physical address, length) ranges."""
        with self.lock:
            return self.hinting.hinted_ranges()

    def clear_hinted(self, dirty: np.ndarray | Iterable[tuple[int, int]]) -> int:
        """Drop hints for pages dirtied since (bool array by PFN, or (gpa, length) ranges); return how many."""
        with self.lock:
            return self.hinting.clear(dirty)

    # --- queue processing ---------------------------------------------------------------------------------

    def _drain(self, queue: SplitVirtqueue, handler: Callable[[DescriptorChain], int | None]) -> None:
        """Complete every available chain (VirtioDevice.drain; the stats buffer is kept: None)."""
        self.drain(queue, handler, fault_counter="errors", error=BalloonError)

    def _push(self, queue: SplitVirtqueue, head: int, written: int) -> None:
        try:
            queue.push_used(head, written)
        except VirtqueueError as err:
            raise BalloonError(f"balloon queue {queue.index}: {err}") from err

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        """The PFNs of an inflate or deflate buffer; malformed buffers count one error and keep what is valid."""
        assert self._memory is not None
        length = chain.readable_length
        if chain.writable or length % PFN.size or length > MAX_PFNS_PER_BUFFER * PFN.size or not length:
            self.count("errors")
        data = chain.read_all(self._memory, MAX_PFNS_PER_BUFFER * PFN.size)
        data = data[:len(data) - len(data) % PFN.size]
        return [pfn for (pfn,) in PFN.iter_unpack(data)]

    def _page_runs(self, pfns: list[int]) -> list[tuple[int, int]]:
        assert self._ram is not None
        page_runs, outside = self._ram.page_runs(pfns)
        if outside:
            self.count("errors", outside)
        return page_runs

    def _inflate(self, chain: DescriptorChain) -> int:
        assert self._memory is not None and self._ram is not None
        self.count("inflate_requests")
        runs = self._page_runs(self._pfns(chain))
        if self._guarded:  # virtio-mem memory: leave out pages in unplugged blocks
            runs = [part for run in runs for part in self._accessible_runs(*run)]
        for first, count in runs:
            self._inflated.set_run(first, count)
            self.count("pages_inflated", count)
        # On 2 MiB host pages only those whose 512 guest pages are all inflated (pages.py, whole_host_pages).
        for first, count in self._ram.whole_host_pages(runs, self._inflated):
            if self._discard(first, count, "balloon-inflate"):
                self.count("bytes_discarded", count << BALLOON_PAGE_SHIFT)
        return 0

    def _accessible_runs(self, first: int, count: int) -> Iterator[tuple[int, int]]:
        """The parts of a run of pages the guest may use (not in unplugged virtio-mem blocks); the rest is counted."""
        assert self._memory is not None
        if not any(low < first + count and first < high for low, high in self._guarded):
            yield first, count  # boot RAM: every page of the balloon's RAM may be used
            return
        contains = self._memory.contains
        if contains(first << BALLOON_PAGE_SHIFT, count << BALLOON_PAGE_SHIFT):
            yield first, count
            return
        start = None
        for pfn in range(first, first + count + 1):
            ok = pfn < first + count and contains(pfn << BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE)
            if ok and start is None:
                start = pfn
            elif not ok and start is not None:
                yield start, pfn - start
                start = None
            if not ok and pfn < first + count:
                self.count("pages_ignored")

    def _deflate(self, chain: DescriptorChain) -> int:
        assert self._ram is not None
        self.count("deflate_requests")
        pages, outside = self._ram.pages(self._pfns(chain))
        if outside:
            self.count("errors", outside)
        self._inflated.clear_pages(pages)
        self.count("pages_deflated", len(pages))
        log = discard_log.active
        if log is not None:  # not a discard, but when a discarded page went back to the guest
            self._log_deflate(log, pages)
        return 0

    def _log_deflate(self, log: discard_log.DiscardLog, pages: set[int]) -> None:
        assert self._memory is not None and self._ram is not None
        now = discard_log.now_ns()
        for first, count in self._ram.page_runs(pages)[0]:
            gpa = first << BALLOON_PAGE_SHIFT
            try:
                region = self._memory.region_at(gpa)
            except GuestMemoryError:  # in unplugged virtio-mem memory: named without an offset
                log.record(now, "balloon-deflate", "give-back", gpa, count << BALLOON_PAGE_SHIFT, "?", 0)
                continue
            log.record(now, "balloon-deflate", "give-back", gpa, count << BALLOON_PAGE_SHIFT, region.name,
                       gpa - region.gpa)  # fmt: skip

    def _discard(self, first: int, count: int, who: str) -> bool:
        """Give pages the guest may use back to the host; a failure is the host's, logged and counted as such.
        `who` names the path in the discard log (memvisor/memory/discard_log.py)."""
        assert self._memory is not None
        try:
            self._memory.discard(first << BALLOON_PAGE_SHIFT, count << BALLOON_PAGE_SHIFT, who)
        except (DiscardError, GuestMemoryError) as err:  # checked accessible before: the host's failure
            log.warning("balloon: %s", err)
            self.count("discard_failures")
            return False
        return True

    def _receive_stats(self, chain: DescriptorChain) -> int | None:
        """Keep the new stats buffer; a second one while one is held gets the older one returned."""
        assert self._memory is not None
        if chain.writable or chain.readable_length > MAX_STATS_BYTES:
            self.count("errors")
        if self._stats_head is not None:
            self.count("errors")  # the driver has only one stats buffer: give back the older one
            head, self._stats_head = self._stats_head, None
            queue = self._queues[QueueRole.STATS]
            self._push(queue, head, 0)
            self.signal_used(queue)  # the new buffer is held: without this the driver never hears of the old one
        result = self.stats.parse(chain.read_all(self._memory, MAX_STATS_BYTES))
        self.count("stats_updates")
        if result.unknown:
            self.count("stats_unknown_tags", result.unknown)
        if result.trailing:
            self.count("errors")
        self._stats_head = chain.head
        return None

    def _return_stats_buffer(self) -> bool:
        queue = self._queues.get(QueueRole.STATS)
        if queue is None or self._stats_head is None:
            return False
        head, self._stats_head = self._stats_head, None
        try:
            self._push(queue, head, 0)
        except BalloonError as err:
            self.report_failure(err)
            return False
        self.count("stats_requests")
        self.signal_used(queue)
        return True

    def _receive_hints(self, chain: DescriptorChain) -> int:
        """A command id (one le32 readable buffer) and/or free blocks (writable buffers)."""
        assert self._memory is not None
        if chain.readable:
            if chain.readable_length != CMD_ID.size:
                self.count("errors")
            data = chain.read_all(self._memory, CMD_ID.size)
            if len(data) == CMD_ID.size:
                self.hinting.on_cmd_id(CMD_ID.unpack(data)[0])
        for desc in chain.writable:
            if self.hinting.state is not HintState.ACTIVE:
                self.count("hints_ignored")
                continue
            pages = self.hinting.on_hint(desc.addr, desc.length)
            if pages is None:
                self.count("errors")
            else:
                self.count("hint_pages", pages)
        return 0

    def _receive_report(self, chain: DescriptorChain) -> int:
        """A batch of free blocks (writable buffers): discard them unless free pages carry a poison value."""
        assert self._ram is not None
        self.count("report_requests")
        if chain.readable:
            self.count("errors")
        keep = self.poison_active
        for desc in chain.writable:
            clipped = self._ram.clip(desc.addr, desc.length)
            if clipped is None:
                self.count("errors")
                continue
            for first, count in self._accessible_runs(*clipped):
                self.count("pages_reported", count)
                whole = self._ram.inward(first, count)  # only whole host pages (hugetlbfs: 2 MiB aligned)
                if not keep and whole is not None and self._discard(*whole, "balloon-report"):
                    self.count("bytes_discarded", whole[1] << BALLOON_PAGE_SHIFT)
        return 0

    # --- helpers ------------------------------------------------------------------------------------------

    def _config_bytes(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual, self.hinting.config_cmd_id, self.poison_val)

    def _emit_change(self) -> None:
        size = self.guest_memory_bytes()
        for listener in list(self._listeners):
            try:
                listener(size)
            except Exception:  # a control-plane bug must not break the device
                log.exception("balloon: change listener failed")

    def _require_feature(self, bit: int, what: str, option: str) -> None:
        if self._memory is None or not has_feature(self._features, bit):
            raise UsageError(f"balloon: {what} is not in use by the guest driver; enable {option} and wait for "
                             "the driver to start")

    def _arm_timer(self, delay: float | None = None) -> None:
        """Start the stats timer: after `delay` seconds (default: one polling interval)."""
        if not self._use_timer or not self._stats_interval or self._memory is None:
            return
        timer = threading.Timer(self._stats_interval if delay is None else delay, self._timer_fired)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        with self.lock:
            if self._timer is None or threading.current_thread() is not self._timer:
                return  # cancelled or replaced meanwhile
            self._timer = None
            self._next_stats_at = time.monotonic() + self._stats_interval
            self._return_stats_buffer()
            self._arm_timer()
