"""One thread that waits on many eventfds (epoll, through `selectors`) and runs a handler for each that fires.

    loop = EventfdLoop("device-events")
    loop.add(fd, handler)      # before or after start(); fd: a non-blocking eventfd
    loop.start()
    loop.flush(timeout)        # returns once everything signalled before the call was handled
    loop.stop(timeout)         # ends the thread; the caller closes its own fds afterwards

When an eventfd fires the loop reads it (which resets its counter: N signals since the last read make one
call) and calls its handler on the loop thread. A handler that raises is logged and the loop goes on; a
handler that blocks holds up every other fd of the loop (handlers are short or hand their work on).
`flush` is the barrier a pause needs: the writers are stopped first (the vCPUs parked), then whatever they
signalled is handled before `flush` returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Handler = Callable[[], object]  # its result is ignored


def make_eventfd() -> int:
    """A fresh non-blocking, close-on-exec eventfd with counter 0."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def take(fd: int) -> bool:
    """Read (and so reset) eventfd `fd`; False when it was not signalled or is gone."""
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        return False
    return True


class EventfdLoop:
    """An epoll loop over eventfds on one daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake = make_eventfd()
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._barriers: list[threading.Event] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self.handled = 0  # handler calls made (one per fire, however many signals it gathered)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def add(self, fd: int, handler: Handler) -> None:
        """Call `handler()` on the loop thread each time eventfd `fd` fires (epoll registration is thread-safe)."""
        self._selector.register(fd, selectors.EVENT_READ, handler)

    def remove(self, fd: int) -> None:
        """Stop watching `fd` (before the caller closes it)."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def start(self) -> None:
        if self._thread is not None or self._stopping:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every fd signalled before this call has been handled; False if that took over `timeout`.
        True at once when the loop is not running or this is the loop's own thread (nothing could be waited for)."""
        if not self.running or threading.current_thread() is self._thread:
            return True
        done = threading.Event()
        with self._lock:
            if self._closed:
                return True
            self._barriers.append(done)
            os.eventfd_write(self._wake, 1)
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> bool:
        """End the loop thread (after the handler it is in, if any); False if it did not end within `timeout`."""
        with self._lock:
            self._stopping = True
            if not self._closed:
                os.eventfd_write(self._wake, 1)
        thread = self._thread
        if thread is None:
            self._close()
            return True
        if thread is threading.current_thread():
            return False  # a handler stopping its own loop: the loop ends after it and closes itself
        thread.join(timeout)
        if thread.is_alive():
            log.error("%s: the event loop did not end within %.0f s (a handler is stuck); left running", self.name,
                      timeout)  # fmt: skip
            return False
        return True

    def _run(self) -> None:
        try:
            while True:
                self._handle(self._selector.select())
                with self._lock:
                    barriers, self._barriers = self._barriers, []
                    stopping = self._stopping
                if barriers:
                    # A second, non-blocking pass: whatever was signalled before the barrier was posted is ready
                    # now, even if epoll reported the wake fd first.
                    self._handle(self._selector.select(0))
                    for barrier in barriers:
                        barrier.set()
                if stopping:
                    break
        except Exception:  # the selector itself failed: nothing more can be served; say so once
            log.exception("%s: the event loop failed", self.name)
        finally:
            self._close()

    def _handle(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in events:
            handler: Handler | None = key.data
            if not take(key.fd) or handler is None:
                continue
            self.handled += 1
            try:
                handler()
            except Exception:
                log.exception("%s: a handler failed", self.name)

    def _close(self) -> None:
        """Release the selector and the wake fd, once; a flush waiting then is let go (nothing is left to run)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on nobody writes the wake fd
            for barrier in self._barriers:
                barrier.set()
            self._barriers = []
        self._selector.close()
        os.close(self._wake)
