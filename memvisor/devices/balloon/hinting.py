"""Free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT, virtio 1.2 section 5.5.6.4): the guest tells which
pages are free so that live migration can skip sending them.

One round runs under a command id the host chooses:

1. host: `start()` picks a new id (>= 2) and puts it in the config field free_page_hint_cmd_id, then a
   config interrupt;
2. guest: sends the id back (one le32 device-readable buffer) on the free page queue, then buffers naming
   free memory (device-writable buffers whose address and length are a free block, usually MAX_ORDER-1
   pages, 4 MiB); the driver holds those pages until the round is DONE, so they stay free meanwhile;
3. host: `stop()` writes STOP (0) when migration no longer wants hints (the guest answers with a STOP id);
4. host: `done()` writes DONE (1): the guest gives the held pages back to its allocator.

Hints count only while a round is active: after the guest echoed the current id and before a stop. An
echo of another id (a stale round) starts nothing. Hinted pages are recorded, never discarded: migration
reads `hinted_pages()`, sends a page only if it was dirtied since, and drops hints of pages it sees
dirtied with `clear()`. With a non-zero page poison value a skipped page would arrive as zeros instead of
the poison pattern; the device reports `poison_active` so migration can decide.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from memvisor.devices.balloon.constants import (
    BALLOON_PAGE_SHIFT,
    CMD_ID_DONE,
    CMD_ID_FIRST,
    CMD_ID_STOP,
)
from memvisor.devices.balloon.pages import BalloonRam, PageBitmap

if TYPE_CHECKING:
    import numpy as np  # only the migration side (dirty masks, hinted_pages) uses numpy, imported there

CMD_ID_LIMIT = 1 << 32


class HintState(enum.Enum):
    IDLE = "idle"  # no round since reset
    REQUESTED = "requested"  # the host asked, the guest has not echoed the id yet
    ACTIVE = "active"  # the guest echoed the id: hints are recorded
    STOPPED = "stopped"  # the host or the guest stopped the round
    DONE = "done"  # the host released the pages


class FreePageHinting:
    """The command id state machine and the bitmap of hinted pages for the current round."""

    def __init__(self) -> None:
        self.config_cmd_id = CMD_ID_DONE  # what the driver reads in free_page_hint_cmd_id
        self.state = HintState.IDLE
        self._next_id = CMD_ID_FIRST
        self._current_id: int | None = None
        self._ram: BalloonRam | None = None
        self.bitmap = PageBitmap(0)
        # The pages the guest wrote since the previous call (the VMM's KVM dirty log), asked for before each
        # hint is recorded, so that a write counts against a hint only if it came after the hint (the
        # driver's own zeroing of a block, init_on_alloc, comes before). Its arguments are the hint about to
        # be recorded (first PFN, page count), so the log can make that hint's next write show (KVM's manual
        # protection). None: no dirty log; an error: every hint is dropped (nothing can be trusted).
        self.dirty_source: Callable[[int, int], np.ndarray] | None = None

    def attach(self, ram: BalloonRam) -> None:
        """Use the guest RAM layout of the activated device (hints outside it are ignored)."""
        self._ram = ram
        self.bitmap = PageBitmap(ram.pfn_limit)

    @property
    def current_id(self) -> int | None:
        """The id of the latest round the host started, None before the first."""
        return self._current_id

    @property
    def next_id(self) -> int:
        """The command id the next round will use."""
        return self._next_id

    def load_ids(self, next_id: int, current_id: int | None) -> None:
        """A snapshot's command ids (a restore; the caller checked they fit 32 bits)."""
        self._next_id = next_id
        self._current_id = current_id

    # --- host side ---------------------------------------------------------------------------------------

    def start(self) -> int:
        """Begin a new round: forget earlier hints and return the new command id."""
        cmd_id = self._next_id
        self._next_id = cmd_id + 1 if cmd_id + 1 < CMD_ID_LIMIT else CMD_ID_FIRST
        self._current_id = cmd_id
        self.config_cmd_id = cmd_id
        self.state = HintState.REQUESTED
        self.bitmap.clear()
        return cmd_id

    def stop(self) -> None:
        """Ask the guest to stop hinting; hints already recorded stay."""
        self.config_cmd_id = CMD_ID_STOP
        if self.state in (HintState.REQUESTED, HintState.ACTIVE):
            self.state = HintState.STOPPED

    def done(self) -> None:
        """Let the guest reuse the pages it hinted; the recorded hints stay for migration to read."""
        self.config_cmd_id = CMD_ID_DONE
        self.state = HintState.DONE

    # --- guest side --------------------------------------------------------------------------------------

    def on_cmd_id(self, cmd_id: int) -> bool:
        """The guest sent `cmd_id` on the queue; return True if it was the expected id."""
        if cmd_id == self._current_id and self.state is HintState.REQUESTED:
            self.state = HintState.ACTIVE
            return True
        if self.state is HintState.ACTIVE and cmd_id != self._current_id:
            # The guest's STOP (or any other id) ends an active round; a stale stop before it started
            # is ignored, as QEMU does.
            self.state = HintState.STOPPED
            return cmd_id == CMD_ID_STOP
        return cmd_id == CMD_ID_STOP

    def on_hint(self, gpa: int, length: int) -> int | None:
        """The guest hinted [gpa, gpa+length) free; return the pages recorded, or None if outside RAM.

        Hints outside an active round are ignored (0 pages). Partial pages at either end are not recorded.
        """
        if self.state is not HintState.ACTIVE:
            return 0
        if self._ram is None:
            return None
        clipped = self._ram.clip(gpa, length)
        if clipped is None:
            return None
        first, count = clipped
        if self.dirty_source is not None:
            try:
                self.bitmap.clear_dirty(self.dirty_source(first, count))
            except Exception:  # the log is lost: keep no hint that a later write could have voided
                self.bitmap.clear()
        return self.bitmap.set_run(first, count)

    # --- for migration -----------------------------------------------------------------------------------

    def hinted_pages(self) -> np.ndarray:
        """A copy of the hint bitmap: element i is True when the 4 KiB page at guest address i << 12 was hinted."""
        return self.bitmap.to_array()

    def hinted_ranges(self) -> list[tuple[int, int]]:
        """The hinted memory as (guest physical address, length in bytes) ranges."""
        return [(first << BALLOON_PAGE_SHIFT, count << BALLOON_PAGE_SHIFT) for first, count in self.bitmap.ranges()]

    def clear(self, dirty: np.ndarray | Iterable[tuple[int, int]]) -> int:
        """Drop hints of pages the guest wrote since: a bool array indexed by PFN, an integer array of PFNs, or
        (gpa, length) ranges.

        Any page a range touches, even partly, loses its hint. Return how many hints were dropped.
        """
        import numpy as np

        if isinstance(dirty, np.ndarray):
            return self.bitmap.clear_dirty(dirty)
        dropped = 0
        for gpa, length in dirty:
            if length <= 0 or gpa < 0:
                continue
            first = gpa >> BALLOON_PAGE_SHIFT
            end = -(-(gpa + length) >> BALLOON_PAGE_SHIFT)
            first = min(first, self.bitmap.size)
            dropped += self.bitmap.clear_run(first, min(end, self.bitmap.size) - first)
        return dropped

    def reset(self) -> None:
        """The driver reset: no round runs any more, hints are void."""
        self.config_cmd_id = CMD_ID_DONE
        self.state = HintState.IDLE
        self.bitmap.clear()
