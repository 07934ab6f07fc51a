"""A small single-threaded event loop that bridges local file descriptors and mux channels.

Both ends of the lab use it: the host runner (stdin, forwarded-socket clients) and the agent inside the lab
(the command's pipes, connections to the forwarded sockets). Every fd is non-blocking and every write is
buffered, so one slow reader never blocks the others (a blocked write to one client would otherwise stall
the whole port, and with it the command's output).

- `Reactor` polls the fds of its handlers, asking each whether it wants to read or write right now.
- `Link` is the frame side: the virtio port inside the lab, the chardev socket on the host.
- `Stream` bridges one local fd (a pipe or a connected socket) to one channel: reads become DATA frames
  (paused while the link is backed up), received DATA is written out; EOF in either direction travels as an
  EOF frame (a half close), errors as CLOSE.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from memvisor.lab.mux import Frame, FrameDecoder, Kind, data_frames

READ_CHUNK = 64 * 1024
# Streams stop reading while this much is waiting to go out on the link (backpressure).
LINK_HIGH_WATER = 1 << 20

_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EIO, errno.EBADF)


if TYPE_CHECKING:  # typing is one more module to read over 9p inside the lab: only for the checker
    from typing import Protocol

    class Handler(Protocol):
        def fileno(self) -> int: ...
        def wants_read(self) -> bool: ...
        def wants_write(self) -> bool: ...
        def on_readable(self) -> None: ...
        def on_writable(self) -> None: ...


class Reactor:
    """Polls a set of handlers; the events asked for are recomputed before every poll."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._handlers: dict[int, Handler] = {}
        self._events: dict[int, int] = {}

    def add(self, handler: Handler) -> None:
        self._handlers[handler.fileno()] = handler

    def remove(self, handler: Handler) -> None:
        fd = handler.fileno()
        if self._handlers.get(fd) is handler:
            del self._handlers[fd]
            if self._events.pop(fd, 0):
                self._selector.unregister(fd)

    def _refresh(self) -> None:
        for fd, handler in self._handlers.items():
            wanted = (selectors.EVENT_READ if handler.wants_read() else 0) | (
                selectors.EVENT_WRITE if handler.wants_write() else 0
            )
            current = self._events.get(fd, 0)
            if wanted == current:
                continue
            if not current:
                self._selector.register(fd, wanted)
            elif not wanted:
                self._selector.unregister(fd)
            else:
                self._selector.modify(fd, wanted)
            self._events[fd] = wanted

    def poll(self, timeout: float | None) -> None:
        """Wait up to `timeout` seconds and run the handlers of every fd that is ready."""
        self._refresh()
        if not self._events:
            if timeout:
                selectors.DefaultSelector().select(timeout)
            return
        for key, events in self._selector.select(timeout):
            handler = self._handlers.get(key.fd)
            if handler is not None and events & selectors.EVENT_WRITE:
                handler.on_writable()
            handler = self._handlers.get(key.fd)
            if handler is not None and events & selectors.EVENT_READ:
                handler.on_readable()

    def close(self) -> None:
        self._selector.close()


class Readable:
    """Calls `callback` whenever `fd` is readable (a pidfd, a listening socket, a wake-up pipe)."""

    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd = fd
        self.callback = callback

    def fileno(self) -> int:
        return self.fd

    def wants_read(self) -> bool:
        return True

    def wants_write(self) -> bool:
        return False

    def on_readable(self) -> None:
        self.callback()

    def on_writable(self) -> None:
        pass


class Link:
    """The frame side of the bridge: decodes what arrives, buffers what leaves."""

    def __init__(self, fd: int, on_frame: Callable[[Frame], None]) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.on_frame = on_frame
        self.closed = False
        self._decoder = FrameDecoder()
        self._out = bytearray()

    def fileno(self) -> int:
        return self.fd

    @property
    def backlog(self) -> int:
        return len(self._out)

    def send(self, frame: Frame) -> None:
        if self.closed:
            return
        self._out += frame.encode()
        self.on_writable()

    def send_data(self, channel: int, data: bytes) -> None:
        for frame in data_frames(channel, data):
            self.send(frame)

    def wants_read(self) -> bool:
        return not self.closed

    def wants_write(self) -> bool:
        return not self.closed and bool(self._out)

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            if error.errno not in _GONE:
                raise
            data = b""
        if not data:
            self.closed = True
            return
        for frame in self._decoder.feed(data):
            self.on_frame(frame)

    def on_writable(self) -> None:
        while self._out and not self.closed:
            try:
                written = os.write(self.fd, self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno not in _GONE:
                    raise
                self.closed = True
                return
            del self._out[:written]

    def flush(self, reactor: Reactor, timeout: float) -> bool:
        """Block (running `reactor`) until everything queued has been written; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._out and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            reactor.poll(min(remaining, 0.1))
        return not self._out


class Stream:
    """One local fd bridged to one mux channel.

    `readable`: bytes read from the fd go to the link as DATA, end of file as EOF.
    `writable`: DATA received for the channel is written to the fd; a received EOF shuts the fd's write side
    (a socket's SHUT_WR, or closing a pipe) once everything before it is written.
    The stream closes its fd when neither direction is open any more, and then calls `on_closed`.
    """

    def __init__(
        self,
        link: Link,
        channel: int,
        fd: int,
        *,
        readable: bool,
        writable: bool,
        sock: socket.socket | None = None,
        on_closed: Callable[[Stream], None] | None = None,
    ) -> None:
        os.set_blocking(fd, False)
        self.link = link
        self.channel = channel
        self.fd = fd
        self.sock = sock
        self.reading = readable
        self.writing = writable
        self.closed = False
        self._shut_after_drain = False
        self._out = bytearray()
        self._on_closed = on_closed

    def fileno(self) -> int:
        return self.fd

    @property
    def pending(self) -> int:
        """Bytes received for this channel and not yet written to the fd."""
        return len(self._out)

    # -- link -> fd --------------------------------------------------------------------------------
    def deliver(self, frame: Frame) -> None:
        """Handle a frame the link received for this channel."""
        if self.closed:
            return
        if frame.kind is Kind.DATA and self.writing and not self._shut_after_drain:
            self._out += frame.payload
            self.on_writable()
        elif frame.kind is Kind.EOF:
            self._shut_after_drain = True
            self.on_writable()
        elif frame.kind is Kind.CLOSE:
            self.close(notify=False)

    def wants_write(self) -> bool:
        return not self.closed and self.writing and (bool(self._out) or self._shut_after_drain)

    def on_writable(self) -> None:
        while self._out and not self.closed:
            try:
                written = os.write(self.fd, self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno not in _GONE:
                    raise
                self.close(notify=True)
                return
            del self._out[:written]
        if self._shut_after_drain and self.writing and not self.closed:
            self.writing = False
            self._out.clear()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
            self._maybe_close()

    # -- fd -> link --------------------------------------------------------------------------------
    def wants_read(self) -> bool:
        return not self.closed and self.reading and self.link.backlog < LINK_HIGH_WATER

    def on_readable(self) -> None:
        if not self.reading or self.closed:
            return
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            if error.errno not in _GONE:
                raise
            self.close(notify=True)
            return
        if data:
            self.link.send_data(self.channel, data)
            return
        self.reading = False
        self.link.send(Frame(self.channel, Kind.EOF))
        self._maybe_close()

    def drain(self) -> None:
        """Read everything the fd holds right now (used once a command has exited)."""
        while self.reading and not self.closed:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close(notify=True)
                return
            if data:
                self.link.send_data(self.channel, data)
            else:
                self.reading = False
                self.link.send(Frame(self.channel, Kind.EOF))
                self._maybe_close()

    # -- closing -----------------------------------------------------------------------------------
    def _maybe_close(self) -> None:
        if not self.reading and not self.writing:
            self.close(notify=False)

    def close(self, *, notify: bool) -> None:
        """Close the fd; with `notify`, tell the other end the channel is gone (CLOSE)."""
        if self.closed:
            return
        self.closed = True
        if notify:
            self.link.send(Frame(self.channel, Kind.CLOSE))
        if self._on_closed is not None:
            self._on_closed(self)
        if self.sock is not None:
            self.sock.close()
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)
