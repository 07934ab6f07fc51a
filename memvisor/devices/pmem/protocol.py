"""The virtio-pmem wire format (virtio 1.2 section 5.19, Linux include/uapi/linux/virtio_pmem.h)."""

from __future__ import annotations

import struct

# struct virtio_pmem_config, virtio 1.2 section 5.19.4: le64 start, le64 size.
CONFIG = struct.Struct("<QQ")

# struct virtio_pmem_req, virtio 1.2 section 5.19.6: le32 type.
REQUEST = struct.Struct("<I")

# struct virtio_pmem_resp, virtio 1.2 section 5.19.6: le32 ret (0 is success; Linux nd_virtio.c turns any
# other value into -EIO).
RESPONSE = struct.Struct("<i")

VIRTIO_PMEM_REQ_TYPE_FLUSH = 0

RET_OK = 0
RET_FAILED = -1  # what the project's issue asks; QEMU writes 1, Linux treats both as failure
