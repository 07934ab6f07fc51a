"""The source of a live migration: pre-copy over the dirty tracker, then stop-and-copy and the machine state.

    1 setup    subscribe to the dirty tracker, start a free page hint round (a balloon with free-page-hint),
               send CONFIG and wait for the destination's ACK (it refuses another machine before any RAM)
    2 passes   pass 1 sends every page, each later pass the pages written since the previous one; a pass
               ends by reading the dirty set; when it fits the downtime limit (or after `max_passes`), the
               loop ends. The estimate (DowntimeEstimate) is the pass's fixed part (its time outside sending
               pages: the backed-set scan, masks, dirty log reads, which the final pass repeats) plus the
               dirty pages' bytes at the pass's page bandwidth (net of its runs' cost, pass_bandwidth) plus a
               cost per run of them (timed at setup, Sender.run_seconds: the final pass's pages are scattered,
               pass 1's runs are long)
    3 final    hinting stops, the vCPUs are parked and the devices held (memvisor.vmm.snapshot.quiesced), the
               last dirty pages go (no dirty log clears: nothing writes), then STATE (the snapshot's
               MachineState) and END; the destination loads the state (creating its vCPUs) and ACKs, then
               runs the guest; this machine stays paused ("postmigrate"). Each step is timed in
               `MigrationStats.downtime_parts` (query-migrate's x-downtime-parts). Not in the estimate:
               pausing, the device state's capture and send, the destination's load and ACK, its resume

What is not sent (counted by reason in `MigrationStats.skipped`):
- "free-page-hint": pages the guest hinted free in this round and did not write since (the hinting
  consumer of the dirty tracker drops a hint when its page is written; a page written after its hint is sent);
- "balloon": pages the balloon holds inflated (the guest gave them away);
- "virtio-mem-unplugged": unplugged virtio-mem blocks (the PLUGGED record goes before each pass's RAM; the
  plugged state cannot change while the migration runs: `virtio_mem_held` makes every virtio-mem device answer
  plug and unplug requests BUSY, as QEMU's does, so the bitmap sent and the pages read always agree);
- "unbacked": pages the host does not back in the first pass (holes of the memfd, found with
  SEEK_DATA/SEEK_HOLE), when the destination's memory is still all zeros: never written, or given back
  before the migration (free page reporting): the two look the same;
- "reported": from the second pass on, pages the host backed at the previous pass's look (or that the guest
  wrote since) and no longer backs: given back during the migration, by free page reporting (the guest
  reports free blocks and memvisor punches them out of the memfd, a change the dirty log never sees) or by a
  balloon page inflated and deflated again in between. They go as ZERO records (12 bytes a run), so the
  destination gives them back too instead of keeping what the previous pass sent;
Zero pages with backing go as ZERO records (QEMU's "duplicate"), 12 bytes for a run.
Pages are read with pread from each region's memfd (pages.py), never through the VMM's mapping: a block
unplugged under a pass (a machine reset unplugs them all, `busy` or not) is PROT_NONE there, and reads as a
hole of zeros from the file; the next pass's PLUGGED record carries the change.
The passes converge on the dirty pages a pass would send: pages written and then hinted free, inflated or
unplugged since cost the final pass nothing (`_to_send`).
On the destination a page not sent reads as zero, or holds content the guest declared it does not need.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memvisor.errors import MemvisorError
from memvisor.migration import stream
from memvisor.migration.pages import RegionReader
from memvisor.migration.stream import PAGE_SIZE
from memvisor.migration.throttle import Throttle

if TYPE_CHECKING:
    import socket

    import numpy as np

    from memvisor.memory.guest_memory import MemoryRegion
    from memvisor.vmm.dirty_tracker import DirtyConsumer
    from memvisor.vmm.machine import Machine

SKIP_REASONS = ("free-page-hint", "balloon", "virtio-mem-unplugged", "unbacked", "reported")
ACK_TIMEOUT = 120.0
DEFAULT_DOWNTIME_LIMIT_MS = 300  # QEMU's defaults
DEFAULT_MAX_BANDWIDTH = 128 << 20  # bytes per second
DEFAULT_MAX_PASSES = 30
CHUNK_PAGES = 16384  # 64 MiB: the hinted set is read again before each chunk of a pass
IOV_MAX = 1024  # buffers in one sendmsg (Linux UIO_MAXIOV)
MEASURED_SECONDS = 0.01  # a pass that spent less sending pages keeps the previous pass's page bandwidth
CALIBRATION_RUNS = 64  # single pages read at the start to time what a run costs (Sender.run_seconds)


def _lap(parts: dict[str, int], name: str, since: float) -> float:
    """Record in `parts` the ms from `since` to now under `name`; now."""
    now = time.monotonic()
    parts[name] = int((now - since) * 1000)
    return now


class MigrationCancelled(MemvisorError):
    """migrate_cancel stopped the migration."""


@dataclass
class MigrationParameters:
    downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS
    max_bandwidth: int = DEFAULT_MAX_BANDWIDTH  # bytes/s; 0 = unlimited
    max_passes: int = DEFAULT_MAX_PASSES


@dataclass
class MigrationStats:
    """What query-migrate reports: counters the source updates as it sends (read from other threads)."""

    total: int = 0  # bytes of RAM migrated (all regions)
    transferred: int = 0  # bytes on the wire
    remaining: int = 0  # bytes of the current pass (or dirty set) still to go
    normal: int = 0  # pages sent with data
    duplicate: int = 0  # pages sent as ZERO records
    passes: int = 0  # dirty-sync-count
    dirty_pages_rate: int = 0  # pages/s written in the last pass
    mbps: float = 0.0
    expected_downtime_ms: int = 0
    setup_ms: int = 0
    downtime_ms: int = 0
    throttle_percent: int = 0  # share of time the vCPUs are held (throttle.py)
    downtime_parts: dict[str, int] = field(default_factory=dict)  # ms by stop phase step; "expected"
    dirty_log: str = ""  # "manual-protect" (KVM_CLEAR_DIRTY_LOG per chunk) or "kvm-clears" (KVM_GET_DIRTY_LOG's own)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


@dataclass(frozen=True)
class SourceHooks:
    """The machine-side parts the source uses (a test passes fakes)."""

    hint_start: Callable[[], None] | None = None  # start a free page hint round (None: no hinting balloon)
    hint_stop: Callable[[], None] | None = None
    hinted: Callable[[], np.ndarray] | None = None  # bool by PFN, after applying the dirty log
    inflated: Callable[[], np.ndarray] | None = None  # bool by PFN


def machine_config(machine: Machine) -> dict[str, Any]:
    """The CONFIG record: what the destination's command line must match."""
    from memvisor.vmm.snapshot import saved_regions

    config = machine.config
    return {
        "memory": config.memory,
        "vcpus": config.vcpus,
        "numa_nodes": config.numa_nodes,
        "devices": list(config.extra_devices),
        "regions": [[r.name, r.gpa, r.size] for r in saved_regions(machine)],
        "page_size": PAGE_SIZE,
    }


@contextlib.contextmanager
def virtio_mem_held(machine: Machine) -> Iterator[None]:
    """Every virtio-mem device answers plug/unplug requests BUSY (the guest's driver retries later) until the
    block ends, then takes them again as before.

    Without this a block plugged after a pass's PLUGGED record had its pages sent into memory the destination
    still held unplugged (it refused the stream), and a block unplugged mid-pass was read through its
    now-inaccessible mapping (pages are read from the memfd now, pages.py, which a machine reset's unplugging
    cannot fault). The flag is set under the device's lock: a request being answered finishes first."""
    from memvisor.devices.mem.device import VirtioMemDevice

    held: list[tuple[VirtioMemDevice, bool]] = []
    try:
        for attached in machine.devices:
            device = attached.device
            if isinstance(device, VirtioMemDevice):
                with device.lock:
                    held.append((device, device.busy))
                    device.busy = True
        yield
    finally:
        for device, before in held:
            with device.lock:
                device.busy = before


def run_bounds(pfns: np.ndarray, limit: int) -> tuple[list[int], list[int]]:
    """Consecutive runs of the sorted `pfns` as (firsts, counts), each at most `limit` long (a longer run is cut
    into `limit`-long runs and a rest), computed with numpy: no Python work per page nor per run."""
    import numpy as np

    if not pfns.size:
        return [], []
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [pfns.size])))
    firsts = pfns[starts]
    if counts.max() > limit:
        cuts = -(-counts // limit)  # runs each run is cut into
        which = np.repeat(np.arange(counts.size), cuts)
        offsets = (np.arange(which.size) - np.repeat(np.cumsum(cuts) - cuts, cuts)) * limit
        firsts = firsts[which] + offsets
        counts = np.minimum(counts[which] - offsets, limit)
    return firsts.tolist(), counts.tolist()


def _runs(pfns: np.ndarray, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs of the sorted `pfns` as (first, count), each at most `limit` long."""
    firsts, counts = run_bounds(pfns, limit)
    yield from zip(firsts, counts, strict=True)


def send_pieces(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """`sock.sendall` of the concatenated `pieces` without concatenating them: sendmsg(2) of up to IOV_MAX
    buffers at a time (one system call for a whole batch of records and their pages), resumed after a
    partial write."""
    views = [memoryview(piece).cast("B") for piece in pieces if len(piece)]
    index = 0
    while index < len(views):
        sent = sock.sendmsg(views[index : index + IOV_MAX])
        while index < len(views) and sent >= len(views[index]):
            sent -= len(views[index])
            index += 1
        if sent:
            views[index] = views[index][sent:]


@dataclass(frozen=True)
class DowntimeEstimate:
    """What the final pass is expected to take (ms), from what the previous pass measured."""

    fixed_ms: int  # a pass's work whatever it sends: the backed-set scan, the skip masks, the dirty log reads
    pages_ms: int  # the pages to send: their bytes at the pass's page bandwidth, plus a cost per run

    @property
    def total_ms(self) -> int:
        return self.fixed_ms + self.pages_ms

    def fits(self, limit_ms: int) -> bool:
        """The final pass fits `limit_ms`. More passes shrink only the pages' part: when the fixed part leaves
        less than a quarter of the limit, the pages get that quarter (throttling the guest to get the pages under
        an unreachable limit would slow it for nothing)."""
        return self.pages_ms <= max(limit_ms - self.fixed_ms, limit_ms // 4)


def estimate_downtime(fixed_s: float, page_bandwidth: float, pages: int, runs: int, run_s: float) -> DowntimeEstimate:
    """`pages` in `runs` runs still to send, at `page_bandwidth` bytes/s and `run_s` seconds a run, after the
    `fixed_s` every pass costs."""
    pages_s = pages * PAGE_SIZE / max(page_bandwidth, 1.0) + runs * run_s
    return DowntimeEstimate(int(fixed_s * 1000), int(pages_s * 1000))


def pass_bandwidth(sent: int, paged: float, runs: int, run_s: float) -> float:
    """Bytes/s of a pass's pages net of their runs' cost: `sent` bytes in `paged` seconds of sending pages, `runs`
    runs read at `run_s` seconds each. The estimate adds `runs * run_s` for the next pass's runs, so a pass of
    scattered pages (the later passes of an idle guest) measured by its gross time counted its runs twice: the
    same pass again was expected to take its time plus its runs' cost, and a migration that fitted did not
    converge. At least a tenth of `paged` is kept as the bytes' time (a run cost timed too high at setup)."""
    return sent / max(paged - runs * run_s, paged / 10, 1e-6)


def count_runs(mask: np.ndarray) -> int:
    """Runs of consecutive True in the bool array `mask`."""
    import numpy as np

    if not mask.size:
        return 0
    return int(mask[0]) + int(np.count_nonzero(mask[1:] & ~mask[:-1]))


class Sender:
    """Sends pages and records, keeping `stats`, honouring max-bandwidth and cancellation."""

    def __init__(self, sock: socket.socket, stats: MigrationStats, params: MigrationParameters,
                 cancelled: threading.Event) -> None:  # fmt: skip
        self.sock, self.stats, self.params, self.cancelled = sock, stats, params, cancelled
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._buffer = memoryview(bytearray(stream.MAX_PAGES_PER_RECORD * PAGE_SIZE))  # one record's pages
        self.page_seconds = 0.0  # time spent in send_region_pages (reading, checking and sending pages)
        self.runs = 0  # runs of pages read and sent in send_region_pages (each one read, one or more records)

    def send(self, *pieces: bytes | memoryview) -> None:
        if self.cancelled.is_set():
            raise MigrationCancelled("the migration was cancelled (migrate_cancel)")
        send_pieces(self.sock, list(pieces))
        size = sum(len(piece) for piece in pieces)
        self.stats.transferred += size
        self._window_bytes += size
        limit = self.params.max_bandwidth
        if limit > 0:
            ahead = self._window_bytes / limit - (time.monotonic() - self._window_start)
            if ahead > 0:
                time.sleep(ahead)
            if time.monotonic() - self._window_start > 1.0:
                self._window_start, self._window_bytes = time.monotonic(), 0

    def send_zero_runs(self, region: MemoryRegion, start: int, pages: np.ndarray) -> None:
        """ZERO records for the pages `start + i` of `region` for which `pages[i]`."""
        import numpy as np

        for first, count in _runs(np.flatnonzero(pages) + start, stream.MAX_ZERO_RUN):
            self.send(stream.zero_record(region.gpa + first * PAGE_SIZE, count))

    def send_region_pages(self, region: MemoryRegion, reader: RegionReader, start: int, wanted: np.ndarray,
                          backed: np.ndarray, *, first_pass: bool) -> None:  # fmt: skip
        """Send the pages `start + i` of `region` for which `wanted[i]`: data read with `reader` (from the memfd,
        never through the mapping: pages.py), or ZERO runs (`backed[i]` False: a hole, zero without reading it)."""

        started = time.monotonic()
        try:
            self._send_region_pages(region, reader, start, wanted, backed, first_pass=first_pass)
        finally:
            self.page_seconds += time.monotonic() - started

    def _send_region_pages(self, region: MemoryRegion, reader: RegionReader, start: int, wanted: np.ndarray,
                           backed: np.ndarray, *, first_pass: bool) -> None:  # fmt: skip
        import numpy as np

        unbacked = wanted & ~backed
        if first_pass:
            self.stats.skipped["unbacked"] += int(np.count_nonzero(unbacked))
        else:  # written since the previous pass, yet no longer backed: given back (see "reported" above)
            self.send_zero_runs(region, start, unbacked)
            self.stats.skipped["reported"] += int(np.count_nonzero(unbacked))
        self.stats.remaining = max(0, self.stats.remaining - int(np.count_nonzero(unbacked)) * PAGE_SIZE)
        firsts, counts = run_bounds(np.flatnonzero(wanted & backed) + start, stream.MAX_PAGES_PER_RECORD)
        self.runs += len(firsts)
        batch: list[tuple[int, int]] = []  # runs read into the buffer, one after the other
        used = 0
        for first, count in zip(firsts, counts, strict=True):
            if used + count > stream.MAX_PAGES_PER_RECORD:
                self._send_batch(region, batch, used)
                batch, used = [], 0
            reader.read(first * PAGE_SIZE, self._buffer[used * PAGE_SIZE : (used + count) * PAGE_SIZE])
            batch.append((first, count))
            used += count
        if batch:
            self._send_batch(region, batch, used)

    def _send_batch(self, region: MemoryRegion, batch: list[tuple[int, int]], used: int) -> None:
        """The runs `batch` (first page of `region`, count), read one after the other into the first `used`
        pages of the buffer: one zero check for all of them, then each run as PAGES records for its data and ZERO
        records for its zero pages, all in one send. The records are the ones a run at a time would give."""
        pieces, normal, duplicate = self._batch_records(region, batch, used)
        self.send(*pieces)
        self.stats.normal += normal
        self.stats.duplicate += duplicate
        self.stats.remaining = max(0, self.stats.remaining - used * PAGE_SIZE)

    def _batch_records(self, region: MemoryRegion, batch: list[tuple[int, int]],
                       used: int) -> tuple[list[bytes | memoryview], int, int]:  # fmt: skip
        """The records of `_send_batch` as pieces to send, and the counts of pages they carry as data and as zero."""
        import numpy as np

        view = self._buffer[: used * PAGE_SIZE]
        nonzero = np.asarray(np.frombuffer(view, dtype=np.uint64).reshape(used, PAGE_SIZE // 8).any(axis=1))
        firsts = np.array([first for first, _ in batch], dtype=np.int64)
        counts = np.array([count for _, count in batch], dtype=np.int64)
        run_starts = np.cumsum(counts) - counts  # offset of each run in the buffer
        cut = np.zeros(used, dtype=bool)  # a record starts at each run, and where data turns zero or back
        cut[run_starts] = True
        cut[1:] |= nonzero[1:] != nonzero[:-1]
        starts = np.flatnonzero(cut)
        sizes = np.diff(np.append(starts, used))
        pfns = np.repeat(firsts - run_starts, counts)[starts] + starts
        pieces: list[bytes | memoryview] = []
        normal = duplicate = 0
        records = zip(starts.tolist(), sizes.tolist(), pfns.tolist(), nonzero[starts].tolist(), strict=True)
        for offset, size, pfn, data in records:
            gpa = region.gpa + pfn * PAGE_SIZE
            if data:
                pieces += stream.pages_record(gpa, view[offset * PAGE_SIZE : (offset + size) * PAGE_SIZE])
                normal += size
            else:
                pieces.append(stream.zero_record(gpa, size))
                duplicate += size
        return pieces, normal, duplicate

    def run_seconds(self, region: MemoryRegion, reader: RegionReader, runs: int = CALIBRATION_RUNS) -> float:
        """What one more run of pages costs the sender beyond its bytes: reading `runs` single pages spread over
        `region` into the buffer and building their records, timed, nothing sent. A pass of scattered dirty pages
        (the final one's) pays this for each run, a cost the bandwidth of a pass of long runs does not show."""
        pages = region.size // PAGE_SIZE
        runs = max(1, min(runs, pages, stream.MAX_PAGES_PER_RECORD))
        started = time.monotonic()
        batch = [(index * pages // runs, 1) for index in range(runs)]
        for position, (first, _) in enumerate(batch):
            reader.read(first * PAGE_SIZE, self._buffer[position * PAGE_SIZE : (position + 1) * PAGE_SIZE])
        self._batch_records(region, batch, runs)
        return (time.monotonic() - started) / runs


class PreCopy:
    """One live migration of `machine` over the connected `sock` (run in the job's thread)."""

    def __init__(self, machine: Machine, sock: socket.socket, hooks: SourceHooks, params: MigrationParameters,
                 stats: MigrationStats, cancelled: threading.Event) -> None:  # fmt: skip
        from memvisor.vmm.snapshot import saved_regions

        self.machine, self.sock, self.hooks, self.params = machine, sock, hooks, params
        self.stats, self.cancelled = stats, cancelled
        self.sender = Sender(sock, stats, params, cancelled)
        self.regions = saved_regions(machine)
        self.stats.total = sum(r.size for r in self.regions)
        self._consumer: DirtyConsumer | None = None  # the dirty tracker's, while run() runs
        self._backed: dict[str, np.ndarray] = {}  # region name -> pages the host backed at the last pass's look
        self._readers: dict[str, RegionReader] = {}  # region name -> its reader (pages.py), while run() runs
        self.on_active: Callable[[], None] = lambda: None
        self.on_pass: Callable[[int], None] = lambda number: None

    # --- masks by guest PFN ---------------------------------------------------------------------------------

    def _limit(self) -> int:
        return max((r.gpa + r.size) // PAGE_SIZE for r in self.regions)

    def _fit(self, mask: np.ndarray | None) -> np.ndarray:
        import numpy as np

        fitted = np.zeros(self._limit(), dtype=bool)
        if mask is not None:
            size = min(mask.size, fitted.size)
            fitted[:size] = mask[:size]
        return fitted

    def _unplugged(self) -> np.ndarray:
        """Pages of unplugged virtio-mem blocks."""
        import numpy as np

        from memvisor.devices.mem.device import VirtioMemDevice

        mask = self._fit(None)
        for attached in self.machine.devices:
            device = attached.device
            if isinstance(device, VirtioMemDevice):
                plugged = device.plugged_blocks()  # a copy, taken under the device's lock
                per_block = device.block_size // PAGE_SIZE
                first = device.addr // PAGE_SIZE
                mask[first : first + plugged.size * per_block] = ~np.repeat(plugged, per_block)
        return mask

    def _skip_masks(self) -> dict[str, np.ndarray]:
        hooks = self.hooks
        return {
            "virtio-mem-unplugged": self._unplugged(),
            "balloon": self._fit(hooks.inflated() if hooks.inflated else None),
        }

    def _to_send(self, dirty: np.ndarray) -> np.ndarray:
        """The pages of `dirty` a pass would send now: not hinted free since their write (the guest wrote them,
        then freed and hinted them), not inflated, not unplugged. Convergence is judged on these: the others
        cost the final pass nothing, and a pass just to skip them again would be one pass too many."""
        spared = self._hinted()
        for skip in self._skip_masks().values():
            spared |= skip
        return dirty & ~spared

    def _hinted(self) -> np.ndarray:
        """Pages hinted free and not written since: read again for every chunk (hints arrive during a pass)."""
        return self._fit(self.hooks.hinted() if self.hooks.hinted else None)

    # --- records --------------------------------------------------------------------------------------------

    def _send_plugged(self) -> None:
        from memvisor.devices.mem.device import VirtioMemDevice
        from memvisor.devices.mem.state import save_mem
        from memvisor.snapshot.codec import encode

        entries = [{"id": a.id, "state": encode(save_mem(a.device))} for a in self.machine.devices
                   if isinstance(a.device, VirtioMemDevice)]  # fmt: skip
        if entries:
            self.sender.send(stream.json_record(stream.PLUGGED, {"devices": entries}))

    def _send_pass(self, wanted: np.ndarray, *, first_pass: bool, final: bool = False) -> None:
        """One pass over `wanted`. The `final` one runs with the vCPUs parked and the devices held: nothing writes
        guest memory, so its chunks are not cleared in the dirty log (each clear reads KVM's whole bitmap)."""
        import numpy as np

        self.stats.passes += 1
        self.on_pass(self.stats.passes)
        self.sender.send(stream.pass_record(self.stats.passes))
        self._send_plugged()
        skips = self._skip_masks()
        self.stats.remaining = int(np.count_nonzero(wanted)) * PAGE_SIZE
        for region in self.regions:
            base, pages = region.gpa // PAGE_SIZE, region.size // PAGE_SIZE
            reader = self._readers[region.name]
            backed = reader.data_mask()
            previous = self._backed.get(region.name)
            self._backed[region.name] = backed
            if previous is not None:  # backed at the previous look, not written since, not backed now
                gone = previous & ~backed & ~wanted[base : base + pages]
                for skip in skips.values():
                    gone &= ~skip[base : base + pages]  # inflated or unplugged: counted there, not sent
                self.sender.send_zero_runs(region, 0, gone)
                self.stats.skipped["reported"] += int(np.count_nonzero(gone))
            for start in range(0, pages, CHUNK_PAGES):
                outcome = getattr(self.machine, "outcome", None)
                if outcome is not None:
                    what = f"{outcome.reason.name.lower()}: {outcome.cause or outcome.message}".rstrip(": ")
                    raise MemvisorError(f"the guest stopped during the migration ({what}): nothing was moved")
                end = min(start + CHUNK_PAGES, pages)
                consumer = self._consumer
                # before reading: a write from now on is logged
                if consumer is not None and consumer.manual and not final:
                    self.machine.dirty_tracker.clear(region.gpa + start * PAGE_SIZE, (end - start) * PAGE_SIZE)
                part = wanted[base + start : base + end].copy()
                if part.any():
                    chunk_skips = {reason: skip[base + start : base + end] for reason, skip in skips.items()}
                    self._send_chunk(region, reader, start, part, chunk_skips, backed[start:end], first_pass=first_pass)
        self.stats.remaining = 0

    def _send_chunk(self, region: MemoryRegion, reader: RegionReader, start: int, part: np.ndarray,
                    skips: dict[str, np.ndarray], backed: np.ndarray, *, first_pass: bool) -> None:  # fmt: skip
        """The wanted pages `part` of the chunk at page `start` of `region`, its log cleared just now: skip what
        `skips` (read at the pass's start) and the hints (read now) spare, send the rest."""
        import numpy as np

        base = region.gpa // PAGE_SIZE
        before = int(np.count_nonzero(part))
        settled = np.zeros(part.size, dtype=bool)
        for reason, skip in [*skips.items(), ("free-page-hint", self._hinted()[base + start : base + start + part.size])]:
            hit = part & skip
            self.stats.skipped[reason] += int(np.count_nonzero(hit))
            part &= ~hit
            if reason == "free-page-hint":
                settled = hit
        self.stats.remaining = max(0, self.stats.remaining - (before - int(np.count_nonzero(part))) * PAGE_SIZE)
        consumer = self._consumer
        if consumer is not None and consumer.manual:
            # The clear's read of KVM handed out again the bits of pages written before it. Those of the pages
            # read below are stale (the read sees those writes), and so are those of the pages skipped as
            # hinted: the hints were read after the clear, with every write it found applied first, so such a
            # write came before its page's hint; a write after the clear is logged anew. Forgotten, neither
            # comes back in the next pass (a hinted page did, to be skipped once more, and the pass count read
            # one high). Balloon and virtio-mem skips were judged at the pass's start, before the clear: a page
            # deflated and written in between keeps its bit.
            consumer.forget(base + start, (part & backed) | settled)
        self.sender.send_region_pages(region, reader, start, part, backed, first_pass=first_pass)

    def _wait_ack(self, what: str) -> None:
        self.sock.settimeout(ACK_TIMEOUT)
        try:
            record = stream.read_record(self.sock, (stream.ACK,))
        except TimeoutError:
            raise MemvisorError(f"the destination did not acknowledge {what} within {ACK_TIMEOUT:.0f} s") from None
        except stream.StreamError as error:
            raise MemvisorError(f"the destination broke off at {what}: {error}") from None
        finally:
            self.sock.settimeout(None)
        reply = stream.parse_json(record)
        if reply.get("ok") is not True:
            raise MemvisorError(f"the destination refused the migration: {reply.get('error', 'no reason given')}")

    # --- the phases -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Migrate; raises (MemvisorError, OSError) on failure, leaving the machine paused or running as the
        caller's cleanup decides. On success the machine is paused."""
        import numpy as np

        from memvisor.snapshot.codec import encode
        from memvisor.vmm.snapshot import capture_machine, quiesced

        started = time.monotonic()
        throttle = Throttle(self.machine, enabled=not getattr(self.machine, "paused", True))
        consumer = self.machine.dirty_tracker.subscribe("migration", manual=True)
        self._consumer = consumer
        self.stats.dirty_log = "manual-protect" if consumer.manual else "kvm-clears"
        hinting = False
        stack = contextlib.ExitStack()
        try:
            for region in self.regions:
                reader = RegionReader(region)
                stack.callback(reader.close)
                self._readers[region.name] = reader
            stack.enter_context(virtio_mem_held(self.machine))
            self.sender.send(stream.stream_header(), stream.json_record(stream.CONFIG, machine_config(self.machine)))
            self._wait_ack("the configuration")
            if self.hooks.hint_start is not None:
                with contextlib.suppress(MemvisorError):  # the guest's driver may not offer hinting
                    self.hooks.hint_start()
                    hinting = True
            run_s = max(self.sender.run_seconds(r, self._readers[r.name]) for r in self.regions)
            self.stats.setup_ms = int((time.monotonic() - started) * 1000)
            self.on_active()
            wanted = np.ones(self._limit(), dtype=bool)
            first_pass = True
            page_bandwidth = 0.0  # bytes/s while sending pages, from the last pass that sent enough to tell
            while True:
                pass_start, sent_before = time.monotonic(), self.stats.transferred
                paged_before, runs_before = self.sender.page_seconds, self.sender.runs
                self._send_pass(wanted, first_pass=first_pass)
                first_pass = False
                elapsed = max(time.monotonic() - pass_start, 1e-3)
                paged = max(self.sender.page_seconds - paged_before, 1e-6)
                wanted = self._fit(consumer.take_mask())
                dirty = int(np.count_nonzero(wanted))
                to_send_mask = self._to_send(wanted)
                to_send = int(np.count_nonzero(to_send_mask))
                sent = self.stats.transferred - sent_before
                bandwidth = max(sent / elapsed, 1.0)
                self.stats.mbps = bandwidth * 8 / 1e6
                self.stats.dirty_pages_rate = int(dirty / elapsed)
                if paged >= MEASURED_SECONDS:
                    page_bandwidth = pass_bandwidth(sent, paged, self.sender.runs - runs_before, run_s)
                elif not page_bandwidth:
                    page_bandwidth = bandwidth
                runs = count_runs(to_send_mask)
                estimate = estimate_downtime(elapsed - paged, page_bandwidth, to_send, runs, run_s)
                self.stats.expected_downtime_ms = estimate.total_ms
                self.stats.remaining = to_send * PAGE_SIZE
                converged = estimate.fits(self.params.downtime_limit_ms)
                if converged or self.stats.passes >= self.params.max_passes:
                    break
                throttle.after_pass(self.stats.passes, converged)
                self.stats.throttle_percent = throttle.percent
            throttle.stop()
            if hinting and self.hooks.hint_stop is not None:
                with contextlib.suppress(MemvisorError):
                    self.hooks.hint_stop()
            parts = self.stats.downtime_parts
            parts["expected"] = self.stats.expected_downtime_ms
            stop_start = lap = time.monotonic()
            with quiesced(self.machine):
                lap = _lap(parts, "pause", lap)
                wanted |= self._fit(consumer.take_mask())
                lap = _lap(parts, "dirty-sync", lap)
                self._send_pass(wanted, first_pass=False, final=True)
                lap = _lap(parts, "pages", lap)
                state = encode(capture_machine(self.machine))
                lap = _lap(parts, "capture", lap)
                self.sender.send(stream.json_record(stream.STATE, state), stream.encode_record(stream.END))
                lap = _lap(parts, "send-state", lap)
                self._wait_ack("the end of the stream")
                lap = _lap(parts, "destination", lap)
            _lap(parts, "release", lap)
            self.stats.downtime_ms = int((time.monotonic() - stop_start) * 1000)
        finally:
            throttle.stop()
            consumer.close()
            stack.close()
