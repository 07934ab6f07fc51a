"""The virtio-mem device model (device id 24, virtio 1.2 section 5.15).

A virtio-mem device owns one region of guest physical memory, split into blocks of `block_size` bytes that
are each plugged (usable RAM) or unplugged (given back to the host). The host sets `requested_size`; the
guest driver answers by asking to plug or unplug blocks on the single request queue until its
`plugged_size` matches. The device checks every request as the specification demands and answers

- ACK: done; NACK: plugging more would exceed `requested_size`;
- BUSY: not now (the host set `busy`, e.g. during migration, or preallocation / the KVM mapping failed);
- ERROR: the request is malformed (unaligned, zero blocks, outside the usable region, blocks already in
  the requested state, unknown type, shorter than 24 bytes). Linux marks the device broken on ERROR.

A chain without a writable buffer of at least 10 bytes cannot carry any answer: it is returned with 0 bytes
written and counted in `errors`, so no descriptor head ever leaks.

Only the first `usable_region_size` bytes of the region may be plugged. Like QEMU, the device sizes the
usable region to `requested_size` plus 256 MiB of headroom (two Linux memory blocks of 128 MiB on x86),
capped at the region and rounded up to the block size, so that the driver can add whole memory blocks and
choose where to plug. It only grows when `requested_size` changes and shrinks only on UNPLUG_ALL (and on a
system reset), as section 5.15.4.2 requires; it is 0 while `requested_size` is 0.

Host side: `set_requested_size` (raises a config interrupt), `plugged_size`, `busy`, `system_reset`, and
three hooks for the VMM and the control plane:

- `on_plug(gpa, size)` / `on_unplug(gpa, size)`: map or unmap the blocks in KVM (used when
  VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE keeps unplugged memory out of the guest). An exception from
  `on_plug` turns the request into BUSY and rolls it back; one from `on_unplug` makes it BUSY unchanged.
- `on_size_change(plugged_size)`: the plugged size changed (QMP MEMORY_DEVICE_SIZE_CHANGE).

Plugging optionally preallocates the blocks (fallocate on the memfd, or touching each page); unplugging
punches the blocks out of the backing so the host really gets them back. A virtio reset keeps the block
states (section 5.15.5.2: the driver unplugs all on its next start); UNPLUG_ALL and a system reset punch out
the whole region, whatever the guest did to it.

Unplugged means inaccessible (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, on by default): every unplugged block of
the host mapping is PROT_NONE, and made read-write only while plugged. A guest that loads or stores into an
unplugged block therefore costs the host nothing: KVM cannot fault the page in, KVM_RUN fails with EFAULT and
the VMM stops the VM with a message saying so (the spec says the driver MUST NOT touch unplugged memory; a
Linux driver never does). Descriptors, rings and balloon pages in unplugged blocks are refused by
`GuestMemory` like addresses outside RAM (`MemoryRegion.accessible`). With the feature turned off (old
drivers may read unplugged memory) the mapping stays read-write: such a guest can make the host back
unplugged blocks until the next UNPLUG_ALL or reset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from memvisor.devices.mem.protocol import (
    CONFIG,
    REQUEST,
    RESPONSE,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_BUSY,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    MemRequest,
    encode_response,
)
from memvisor.errors import UsageError
from memvisor.memory.guest_memory import GuestMemoryError
from memvisor.units import format_size
from memvisor.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_MEM,
    VirtioDevice,
    VirtioDeviceError,
    feature_bit,
    has_feature,
)
from memvisor.virtio.queue import VirtqueueError

if TYPE_CHECKING:  # numpy (the block bitmap's too) is imported when a device is made: a machine without
    import numpy as np  # virtio-mem never imports it (it costs seconds of Python start-up in the lab)

    from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
    from memvisor.virtio.queue import DescriptorChain, SplitVirtqueue

log = logging.getLogger(__name__)

MIB = 1 << 20
REGION_ALIGNMENT = 128 * MIB  # a Linux memory block on x86 (docs/LAB.md): the driver hot-adds whole ones
MIN_BLOCK_SIZE = 2 * MIB  # a transparent huge page on x86
USABLE_EXTENT = 256 * MIB  # headroom of the usable region past requested_size (QEMU's value on x86)
QUEUE_SIZE = 128
_PAGE_SIZE = 4096

COUNTER_NAMES = (
    "plug_requests", "unplug_requests", "unplug_all_requests", "state_requests",
    "acks", "nacks", "busy", "errors",
    "bytes_plugged", "bytes_unplugged", "bytes_discarded", "discard_failures", "hook_failures",
)

SizeHook = Callable[[int], None]
RangeHook = Callable[[int, int], None]


class MemError(VirtioDeviceError):
    """The virtio-mem device cannot go on (e.g. the driver refused UNPLUGGED_INACCESSIBLE)."""


def _validate(region: MemoryRegion, block_size: int, requested_size: int, node_id: int | None) -> None:
    """Raise UsageError, naming the fix, for a device layout a Linux driver could not use."""
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(f"virtio-mem block size {format_size(block_size)} is not a power of two of at least "
                         f"{format_size(MIN_BLOCK_SIZE)}; use e.g. 2M or 4M")
    if block_size < region.page_size:  # a block must be given back whole host pages (hugetlbfs: 2M and more)
        raise UsageError(f"virtio-mem block size {format_size(block_size)} is smaller than the "
                         f"{format_size(region.page_size)} host pages behind region {region.name!r}; use "
                         f"block-size={format_size(region.page_size)} or more")
    if region.gpa % REGION_ALIGNMENT:
        raise UsageError(f"virtio-mem region at {region.gpa:#x} is not aligned to "
                         f"{format_size(REGION_ALIGNMENT)}; place it at a multiple of 128M")
    if region.size <= 0 or region.size % block_size:
        raise UsageError(f"virtio-mem region size {format_size(region.size)} is not a multiple of the block "
                         f"size {format_size(block_size)}; round the size to the block size")
    if region.readonly:
        raise UsageError(f"virtio-mem region {region.name!r} is read-only; back it with writable memory")
    if requested_size < 0 or requested_size % block_size or requested_size > region.size:
        raise UsageError(f"virtio-mem requested size {format_size(requested_size)} must be a multiple of the "
                         f"block size {format_size(block_size)} no larger than the region "
                         f"{format_size(region.size)}; choose such a size")
    if node_id is not None and not 0 <= node_id <= 0xFFFF:
        raise UsageError(f"virtio-mem NUMA node {node_id} does not fit 16 bits; give a node from 0 to 65535")


class VirtioMemDevice(VirtioDevice):
    """virtio-mem over `region` (memfd-backed, 128 MiB aligned), in blocks of `block_size` bytes."""

    device_id = VIRTIO_ID_MEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        region: MemoryRegion,
        *,
        block_size: int = MIN_BLOCK_SIZE,
        requested_size: int = 0,
        node_id: int | None = None,
        prealloc: bool = False,
        unplugged_inaccessible: bool = True,
        on_size_change: SizeHook | None = None,
        on_plug: RangeHook | None = None,
        on_unplug: RangeHook | None = None,
    ):
        super().__init__()
        _validate(region, block_size, requested_size, node_id)
        self.region = region
        self.block_size = block_size
        self.node_id = node_id
        self.prealloc = prealloc
        self.unplugged_inaccessible = unplugged_inaccessible
        self.on_size_change = on_size_change
        self.on_plug = on_plug
        self.on_unplug = on_unplug
        self.busy = False  # set by the host (e.g. during migration): state changes answer BUSY
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        from memvisor.devices.mem.blocks import BlockBitmap

        self._bitmap = BlockBitmap(region.size // block_size)
        self._requested_size = requested_size
        self._usable_region_size = 0
        self._resize_usable_region(can_shrink=True)
        self._memory: GuestMemory | None = None
        self._queue: SplitVirtqueue | None = None
        if unplugged_inaccessible:
            try:
                region.protect(0, region.size, accessible=False, who="mem-init")
            except OSError as err:
                raise UsageError(f"virtio-mem region {region.name!r}: cannot make unplugged memory inaccessible "
                                 f"({err.strerror}); raise vm.max_map_count or turn unplugged-inaccessible off") from err
            region.accessible = self._accessible

    def _accessible(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) of the region is all plugged (MemoryRegion.accessible)."""
        if length <= 0:
            return True
        first = offset // self.block_size
        last = (offset + length - 1) // self.block_size
        return self._bitmap.all_plugged(first, last - first + 1)

    # --- host API ---------------------------------------------------------------------------------------

    @property
    def addr(self) -> int:
        return self.region.gpa

    @property
    def region_size(self) -> int:
        return self.region.size

    @property
    def usable_region_size(self) -> int:
        return self._usable_region_size

    @property
    def requested_size(self) -> int:
        return self._requested_size

    @property
    def plugged_size(self) -> int:
        return self._bitmap.plugged_count * self.block_size

    def set_requested_size(self, size: int) -> None:
        """Ask the guest to plug `size` bytes in total; raises a config interrupt."""
        _validate(self.region, self.block_size, size, self.node_id)
        with self.lock:  # the generation moves with the value, before any config read can see it (item 4)
            self._requested_size = size
            self._resize_usable_region(can_shrink=False)
            self.signal_config_change()

    def system_reset(self) -> None:
        """The machine resets: unplug every block (section 5.15.5: SHOULD) and size the usable region anew."""
        with self.lock:
            self._unplug_everything("mem-reset")
            self._resize_usable_region(can_shrink=True)

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """Every maximal plugged range as (gpa, size), in address order (for KVM memslots, migration)."""
        with self.lock:
            return [(self.addr + first * self.block_size, count * self.block_size)
                    for first, count in self._bitmap.plugged_runs()]

    def block_state(self, gpa: int) -> bool:
        """Whether the block holding `gpa` is plugged (for the VMM and tests)."""
        index = (gpa - self.addr) // self.block_size
        if not 0 <= index < len(self._bitmap):
            raise UsageError(f"address {gpa:#x} is outside the virtio-mem region; give an address inside it")
        return self._bitmap.all_plugged(index, 1)

    # --- VirtioDevice -----------------------------------------------------------------------------------

    def device_features(self) -> int:
        features = feature_bit(VIRTIO_F_VERSION_1)
        if self.node_id is not None:
            features |= feature_bit(VIRTIO_MEM_F_ACPI_PXM)
        if self.unplugged_inaccessible:
            features |= feature_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
        return features

    def config_bytes(self) -> bytes:
        """The whole struct virtio_mem_config as the driver sees it now."""
        with self.lock:
            return CONFIG.pack(self.block_size, self.node_id or 0, self.addr, self.region_size,
                               self._usable_region_size, self.plugged_size, self._requested_size)

    def read_config(self, offset: int, length: int) -> bytes:
        config = self.config_bytes()
        if offset < 0 or length <= 0:
            return bytes(max(length, 0))
        return config[offset:offset + length].ljust(length, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """The configuration is read-only for the driver (section 5.15.4.1): writes are ignored."""
        log.debug("virtio-mem: ignored driver write of %d bytes to config offset %d", len(data), offset)

    def accept_features(self, features: int) -> bool:
        """FEATURES_OK does not stick for a driver that would touch unplugged memory (as QEMU; Linux 5.8-5.15)."""
        if self.unplugged_inaccessible and not has_feature(features, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE):
            log.warning("virtio-mem: the guest driver does not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE; use a "
                        "guest kernel of 5.16 or later or turn unplugged-inaccessible off")
            self.count("errors")
            return False
        return True

    def activate(self, memory: GuestMemory, queues: list[SplitVirtqueue], features: int) -> None:
        if self.unplugged_inaccessible and not has_feature(features, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE):
            raise MemError("the guest driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE; use a guest "
                           "kernel of 5.16 or later or turn unplugged-inaccessible off")
        if not queues or not queues[0].ready:
            raise MemError("the guest driver set DRIVER_OK without setting up the virtio-mem request queue")
        with self.lock:
            self._memory = memory
            self._queue = queues[0]

    def reset(self) -> None:
        """Forget the queue; block states stay as they are (section 5.15.5.2)."""
        with self.lock:
            self._queue = None

    def notify(self, queue_index: int) -> None:
        """Answer the available requests (at most one queue's worth per kick, so the work is bounded)."""
        with self.lock:
            queue = self._queue
            if queue is None or queue_index != 0:
                return
            self.drain(queue, self._complete, fault_counter="errors", error=MemError)

    # --- requests ---------------------------------------------------------------------------------------

    def _complete(self, chain: DescriptorChain) -> int:
        """Answer one chain; the bytes written into its response buffer (drain returns the head)."""
        memory = self._memory
        assert memory is not None
        if chain.writable_length < RESPONSE.size:
            log.debug("virtio-mem: request without a %d-byte response buffer, returned unanswered", RESPONSE.size)
            self.count("errors")
            return 0
        try:
            data = chain.read_all(memory, REQUEST.size)
        except (GuestMemoryError, VirtqueueError):
            data = b""
        return chain.write_all(memory, self._answer(data))

    def _answer(self, data: bytes) -> bytes:
        """The response to the request bytes `data`, with the counters updated."""
        if len(data) < REQUEST.size:
            log.warning("virtio-mem: short request of %d bytes", len(data))
            return self._respond(VIRTIO_MEM_RESP_ERROR)
        request = MemRequest.decode(data)
        if request.type == VIRTIO_MEM_REQ_PLUG:
            self.count("plug_requests")
            return self._respond(self._change_state(request, plug=True))
        if request.type == VIRTIO_MEM_REQ_UNPLUG:
            self.count("unplug_requests")
            return self._respond(self._change_state(request, plug=False))
        if request.type == VIRTIO_MEM_REQ_UNPLUG_ALL:
            self.count("unplug_all_requests")
            return self._respond(self._unplug_all_request())
        if request.type == VIRTIO_MEM_REQ_STATE:
            self.count("state_requests")
            return self._state_request(request)
        log.warning("virtio-mem: unknown request type %d", request.type)
        return self._respond(VIRTIO_MEM_RESP_ERROR)

    def _respond(self, response_type: int, state: int = 0) -> bytes:
        name = {VIRTIO_MEM_RESP_ACK: "acks", VIRTIO_MEM_RESP_NACK: "nacks",
                VIRTIO_MEM_RESP_BUSY: "busy"}.get(response_type, "errors")
        self.count(name)
        return encode_response(response_type, state)

    def _block_range(self, request: MemRequest) -> tuple[int, int] | None:
        """(first block, count) of the request, or None unless it is aligned, non-empty and usable."""
        if request.nb_blocks == 0 or request.addr % self.block_size or request.addr < self.addr:
            return None
        first = (request.addr - self.addr) // self.block_size
        if first + request.nb_blocks > self._usable_region_size // self.block_size:
            return None  # also every addr + size that would wrap past 2**64
        return first, request.nb_blocks

    def _change_state(self, request: MemRequest, *, plug: bool) -> int:
        blocks = self._block_range(request)
        if blocks is None:
            return VIRTIO_MEM_RESP_ERROR
        first, count = blocks
        if plug and not self._bitmap.all_unplugged(first, count):
            return VIRTIO_MEM_RESP_ERROR
        if not plug and not self._bitmap.all_plugged(first, count):
            return VIRTIO_MEM_RESP_ERROR
        if plug and self.plugged_size + count * self.block_size > self._requested_size:
            return VIRTIO_MEM_RESP_NACK
        if self.busy:
            return VIRTIO_MEM_RESP_BUSY
        gpa, size = self.addr + first * self.block_size, count * self.block_size
        done = self._plug(gpa, size) if plug else self._unplug(gpa, size, "mem-unplug")
        if not done:
            return VIRTIO_MEM_RESP_BUSY
        self._bitmap.set_range(first, count, plug)
        self.count("bytes_plugged" if plug else "bytes_unplugged", size)
        self._size_changed()
        return VIRTIO_MEM_RESP_ACK

    def _plug(self, gpa: int, size: int) -> bool:
        """Make [gpa, gpa+size) usable; False (nothing changed) when that fails."""
        try:
            if self.unplugged_inaccessible:
                self.region.protect(gpa - self.addr, size, accessible=True, who="mem-plug")
            if self.prealloc:
                self._preallocate(gpa, size)
            if self.on_plug is not None:
                self.on_plug(gpa, size)
        except Exception as err:  # the host could not back or map the blocks: BUSY, roll back
            log.warning("virtio-mem: plugging %#x+%#x failed: %s", gpa, size, err)
            self.count("hook_failures")
            self._make_inaccessible(gpa, size, "mem-plug-rollback")
            self._discard(gpa, size, "mem-plug-rollback")
            return False
        return True

    def plugged_blocks(self) -> np.ndarray:
        """One bool per block, True where plugged (a copy, for a snapshot)."""
        with self.lock:
            return self._bitmap.to_array()

    def load_plugged_state(self, plugged: np.ndarray, requested_size: int, usable_region_size: int) -> None:
        """A snapshot's plugged bitmap and sizes (a restore; the caller validated them against this region). The
        host mapping is left as it was: `apply_plugged_access()` makes it match."""
        with self.lock:
            self._bitmap.load(plugged)
            self._requested_size = requested_size
            self._usable_region_size = usable_region_size

    def apply_plugged_access(self) -> None:
        """Make the host mapping match the bitmap: plugged runs read-write, the rest inaccessible.

        For a bitmap loaded from a snapshot (memvisor/devices/mem/state.py), before the memory image is read
        into the plugged blocks. OSError when the kernel refuses the mprotect."""
        if not self.unplugged_inaccessible:
            return
        self.region.protect(0, self.region.size, accessible=False, who="mem-restore")
        for first, count in self._bitmap.plugged_runs():
            self.region.protect(first * self.block_size, count * self.block_size, accessible=True, who="mem-restore")

    def _make_inaccessible(self, gpa: int, size: int, who: str) -> None:
        if not self.unplugged_inaccessible:
            return
        try:
            self.region.protect(gpa - self.addr, size, accessible=False, who=who)
        except OSError as err:  # the blocks stay mapped: the discard below still frees them
            log.error("virtio-mem: cannot make %#x+%#x inaccessible: %s", gpa, size, err)
            self.count("hook_failures")

    def _unplug(self, gpa: int, size: int, who: str) -> bool:
        """Take [gpa, gpa+size) from the guest and give it back to the host; False if the VMM refused. `who` names
        the path in the discard log (memvisor/memory/discard_log.py)."""
        if self.on_unplug is not None:
            try:
                self.on_unplug(gpa, size)
            except Exception as err:
                log.warning("virtio-mem: unmapping %#x+%#x failed: %s", gpa, size, err)
                self.count("hook_failures")
                return False
        self._make_inaccessible(gpa, size, who)  # first, so the guest cannot fault a page back in after the discard
        self._discard(gpa, size, who)
        return True

    def _preallocate(self, gpa: int, size: int) -> None:
        """Back [gpa, gpa+size) with host memory now, so a plugged block never faults for lack of it."""
        if self.region.fd is not None:
            os.posix_fallocate(self.region.fd, gpa - self.addr, size)
            return
        import numpy as np

        offset = gpa - self.addr
        pages = np.frombuffer(self.region.view[offset:offset + size], dtype=np.uint8)
        pages[::_PAGE_SIZE] = 0  # one write per page: the content of a newly plugged block is undefined

    def _discard(self, gpa: int, size: int, who: str) -> None:
        """Punch [gpa, gpa+size) out of the backing (a host operation: allowed on inaccessible blocks too)."""
        try:
            self.region.discard(gpa - self.addr, size, who)
        except OSError as err:
            log.warning("virtio-mem: discarding %#x+%#x failed: %s", gpa, size, err.strerror)
            self.count("discard_failures")
            return
        self.count("bytes_discarded", size)

    def _unplug_all_request(self) -> int:
        if self.busy:
            return VIRTIO_MEM_RESP_BUSY
        if not self._unplug_everything("mem-unplug-all"):
            return VIRTIO_MEM_RESP_BUSY
        self._resize_usable_region(can_shrink=True)  # no config interrupt for UNPLUG_ALL (5.15.4.2)
        return VIRTIO_MEM_RESP_ACK

    def _unplug_everything(self, who: str) -> bool:
        """Unplug every plugged run; False if the VMM refused one (the runs before it stay unplugged)."""
        changed = False
        ok = True
        for first, count in list(self._bitmap.plugged_runs()):
            gpa, size = self.addr + first * self.block_size, count * self.block_size
            if not self._unplug(gpa, size, who):
                ok = False
                break
            self._bitmap.set_range(first, count, False)
            self.count("bytes_unplugged", size)
            changed = True
        if ok:
            self._discard_region(f"{who}-region")
        if changed:
            self._size_changed()
        return ok

    def _discard_region(self, who: str) -> None:
        """Nothing is plugged: give the host back the whole region (whatever a guest wrote to unplugged blocks)."""
        try:
            self.region.discard(0, self.region_size, who)
        except OSError as err:
            log.warning("virtio-mem: discarding the region failed: %s", err.strerror)
            self.count("discard_failures")

    def _state_request(self, request: MemRequest) -> bytes:
        blocks = self._block_range(request)
        if blocks is None:
            return self._respond(VIRTIO_MEM_RESP_ERROR)
        first, count = blocks
        if self._bitmap.all_plugged(first, count):
            state = VIRTIO_MEM_STATE_PLUGGED
        elif self._bitmap.all_unplugged(first, count):
            state = VIRTIO_MEM_STATE_UNPLUGGED
        else:
            state = VIRTIO_MEM_STATE_MIXED
        return self._respond(VIRTIO_MEM_RESP_ACK, state)

    def _resize_usable_region(self, *, can_shrink: bool) -> None:
        """usable = requested + USABLE_EXTENT, capped at the region, rounded up to a block; 0 if nothing is requested."""
        if self._requested_size == 0:
            size = 0
        else:
            size = min(self.region_size, self._requested_size + USABLE_EXTENT)
            size = -(-size // self.block_size) * self.block_size
        if size >= self._usable_region_size or can_shrink:
            self._usable_region_size = size

    def _size_changed(self) -> None:
        if self.on_size_change is None:
            return
        try:
            self.on_size_change(self.plugged_size)
        except Exception as err:  # a control-plane listener must not break the guest's request
            log.warning("virtio-mem: size-change listener failed: %s", err)
            self.count("hook_failures")
