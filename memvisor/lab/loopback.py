"""Bring the lab's loopback interface up, as any booted Linux system has it.

The lab's init (init.sh) starts no network configuration: QEMU runs with `-net none`, and nothing sets `lo` up.
With `lo` down a process can bind 127.0.0.1 but a connect to it fails with ENETUNREACH, so a migration over
`tcp:127.0.0.1:PORT` between two guests of one lab could not connect. The agent brings `lo` up first thing.

Interface flags through the socket ioctls of netdevice(7): SIOCGIFFLAGS reads them, SIOCSIFFLAGS writes them.
struct ifreq (<net/if.h>) is 40 bytes on x86-64: ifr_name[IFNAMSIZ=16], then a union whose short ifr_flags
sits at offset 16. Self-contained, like cpus and kvm_keys: the agent imports nothing heavy.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913  # <linux/sockios.h>
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1  # <linux/if.h>
IFNAMSIZ = 16
IFREQ = struct.Struct("16sh22x")  # ifr_name, ifr_flags, the rest of the 24-byte union


def bring_loopback_up(name: str = "lo") -> bool:
    """Set IFF_UP on interface `name`; True if it was down and is now up, False if it was up already.

    Raises OSError when the interface does not exist or the caller may not change it (needs CAP_NET_ADMIN)."""
    request = IFREQ.pack(name.encode()[: IFNAMSIZ - 1], 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = IFREQ.unpack(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))
        if flags & IFF_UP:
            return False
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, IFREQ.pack(name.encode()[: IFNAMSIZ - 1], flags | IFF_UP))
        return True
