"""The virtio-mem wire format: feature bits, configuration layout, requests and responses.

Everything here is virtio 1.2 section 5.15 (and Linux include/uapi/linux/virtio_mem.h) written as
`struct.Struct` constants, so that a reader finds each layout by its name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Feature bits, virtio 1.2 section 5.15.3.
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1

# Request types, virtio 1.2 section 5.15.6.
VIRTIO_MEM_REQ_PLUG = 0
VIRTIO_MEM_REQ_UNPLUG = 1
VIRTIO_MEM_REQ_UNPLUG_ALL = 2
VIRTIO_MEM_REQ_STATE = 3

# Response types, virtio 1.2 section 5.15.6.
VIRTIO_MEM_RESP_ACK = 0
VIRTIO_MEM_RESP_NACK = 1
VIRTIO_MEM_RESP_BUSY = 2
VIRTIO_MEM_RESP_ERROR = 3

# Block states in a STATE response, virtio 1.2 section 5.15.6.4.
VIRTIO_MEM_STATE_PLUGGED = 0
VIRTIO_MEM_STATE_UNPLUGGED = 1
VIRTIO_MEM_STATE_MIXED = 2

# struct virtio_mem_config, virtio 1.2 section 5.15.4: block_size, node_id, padding[6], addr, region_size,
# usable_region_size, plugged_size, requested_size (56 bytes).
CONFIG = struct.Struct("<QH6xQQQQQ")

# struct virtio_mem_req, virtio 1.2 section 5.15.6: type, padding[3], then the plug/unplug/state union
# (le64 addr, le16 nb_blocks, padding[3]); 24 bytes whatever the type.
REQUEST = struct.Struct("<H6xQH6x")

# struct virtio_mem_resp, virtio 1.2 section 5.15.6: type, padding[3], then the state union (le16 state).
RESPONSE = struct.Struct("<H6xH")


@dataclass(frozen=True)
class MemRequest:
    """One decoded virtio_mem_req (padding ignored, as the specification requires)."""

    type: int
    addr: int
    nb_blocks: int

    @classmethod
    def decode(cls, data: bytes) -> MemRequest:
        """Decode the first REQUEST.size bytes of `data` (the caller checks the length)."""
        req_type, addr, nb_blocks = REQUEST.unpack_from(data)
        return cls(req_type, addr, nb_blocks)

    def encode(self) -> bytes:
        return REQUEST.pack(self.type, self.addr, self.nb_blocks)


def encode_response(response_type: int, state: int = 0) -> bytes:
    """A virtio_mem_resp; `state` only means something in an ACKed STATE response."""
    return RESPONSE.pack(response_type, state)
