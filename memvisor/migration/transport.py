"""Migration URIs as QEMU spells them: `tcp:HOST:PORT` and `unix:PATH` (a connected stream socket each).

    parse_uri("tcp:127.0.0.1:4444")  -> Endpoint("tcp", ("127.0.0.1", 4444))
    parse_uri("unix:/run/vm.mig")    -> Endpoint("unix", "/run/vm.mig")
    connect(endpoint)                 the source's side; listen(endpoint) + accept the destination's
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from memvisor.errors import UsageError

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "tcp" or "unix"
    address: tuple[str, int] | str

    def __str__(self) -> str:
        if isinstance(self.address, tuple):
            host, port = self.address
            return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        return f"unix:{self.address}"


def is_stream_uri(uri: str) -> bool:
    return uri.startswith(("tcp:", "unix:"))


def parse_uri(uri: str) -> Endpoint:
    """The endpoint of a tcp: or unix: URI; UsageError naming the fix for anything else."""
    if uri.startswith("unix:"):
        path = uri[len("unix:") :]
        if not path:
            raise UsageError(f"migration URI {uri!r} has no path: give unix:PATH")
        return Endpoint("unix", path)
    if uri.startswith("tcp:"):
        host, sep, port = uri[len("tcp:") :].rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"migration URI {uri!r} has no valid port: give tcp:HOST:PORT")
        return Endpoint("tcp", (host or "0.0.0.0", int(port)))
    raise UsageError(f"migration URI {uri!r} is not supported: give tcp:HOST:PORT, unix:PATH or file:PATH")


def connect(endpoint: Endpoint, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """The source's connection (OSError when nothing listens)."""
    if isinstance(endpoint.address, tuple):
        sock = socket.create_connection(endpoint.address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(endpoint.address)
        except OSError:
            sock.close()
            raise
    sock.settimeout(None)
    return sock


def listen(endpoint: Endpoint) -> socket.socket:
    """The destination's listening socket (a stale unix socket file is replaced)."""
    if isinstance(endpoint.address, tuple):
        host, port = endpoint.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target: tuple[str, int] | str = (host, port)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = endpoint.address
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
    try:
        sock.bind(target)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket, give_up: Callable[[], bool], poll: float = 0.5) -> socket.socket | None:
    """The first connection, or None once `give_up()` (polled) says to stop waiting."""
    listener.settimeout(poll)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if give_up():
                return None
            continue
        conn.settimeout(None)
        return conn
