"""memvisor.vmm.event_loop: one thread over many eventfds, with a flush barrier and a clean stop."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

from memvisor.vmm.event_loop import EventfdLoop, make_eventfd, take


@pytest.fixture
def loop() -> Iterator[EventfdLoop]:
    loop = EventfdLoop("test-events")
    yield loop
    loop.stop()


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _eventfd(fds: list[int]) -> int:
    fd = make_eventfd()
    fds.append(fd)
    return fd


def test_handler_runs_on_the_loop_thread(loop: EventfdLoop, fds: list[int]) -> None:
    fd = _eventfd(fds)
    seen: list[str] = []
    loop.add(fd, lambda: seen.append(threading.current_thread().name))
    loop.start()
    os.eventfd_write(fd, 1)
    assert loop.flush(5)
    assert seen == ["test-events"]
    assert not take(fd)  # the loop read the counter


def test_signals_gathered_before_the_loop_looks_make_one_call(fds: list[int]) -> None:
    loop = EventfdLoop("test-events")
    fd = _eventfd(fds)
    calls: list[int] = []
    loop.add(fd, lambda: calls.append(1))
    for _ in range(5):
        os.eventfd_write(fd, 1)
    loop.start()
    assert loop.flush(5)
    loop.stop()
    assert calls == [1]
    assert loop.handled == 1


def test_a_failing_handler_is_logged_and_the_loop_goes_on(loop: EventfdLoop, fds: list[int],
                                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    bad, good = _eventfd(fds), _eventfd(fds)
    calls: list[str] = []

    def fail() -> None:
        raise RuntimeError("handler bug")

    loop.add(bad, fail)
    loop.add(good, lambda: calls.append("good"))
    loop.start()
    with caplog.at_level(logging.ERROR, logger="memvisor.vmm.event_loop"):
        os.eventfd_write(bad, 1)
        assert loop.flush(5)
        os.eventfd_write(good, 1)
        assert loop.flush(5)
    assert calls == ["good"]
    assert "a handler failed" in caplog.text and "handler bug" in caplog.text


def test_flush_waits_for_what_was_signalled_before_it(loop: EventfdLoop, fds: list[int]) -> None:
    fd = _eventfd(fds)
    done: list[float] = []

    def slow() -> None:
        time.sleep(0.2)
        done.append(time.monotonic())

    loop.add(fd, slow)
    loop.start()
    os.eventfd_write(fd, 1)
    assert loop.flush(5)
    assert len(done) == 1


def test_flush_times_out_behind_a_stuck_handler(loop: EventfdLoop, fds: list[int]) -> None:
    fd = _eventfd(fds)
    release = threading.Event()
    loop.add(fd, lambda: release.wait(5))
    loop.start()
    os.eventfd_write(fd, 1)
    time.sleep(0.05)
    assert not loop.flush(0.1)
    release.set()
    assert loop.flush(5)


def test_flush_is_immediate_when_not_running_or_on_the_loop_thread(loop: EventfdLoop, fds: list[int]) -> None:
    assert loop.flush(0)  # not started: nothing to wait for
    fd = _eventfd(fds)
    inner: list[bool] = []
    loop.add(fd, lambda: inner.append(loop.flush(0)))
    loop.start()
    os.eventfd_write(fd, 1)
    assert loop.flush(5)
    assert inner == [True]  # a handler flushing its own loop does not deadlock


def test_removed_fd_is_not_watched(loop: EventfdLoop, fds: list[int]) -> None:
    fd = _eventfd(fds)
    calls: list[int] = []
    loop.add(fd, lambda: calls.append(1))
    loop.start()
    loop.remove(fd)
    loop.remove(fd)  # twice is harmless
    os.eventfd_write(fd, 1)
    assert loop.flush(5)
    assert calls == []
    assert take(fd)  # still signalled: nobody read it


def test_stop_ends_the_thread_and_releases_its_fds(fds: list[int]) -> None:
    loop = EventfdLoop("test-events")
    fd = _eventfd(fds)
    loop.add(fd, lambda: None)
    loop.start()
    thread = loop.thread
    assert thread is not None and thread.is_alive()
    assert loop.stop(5)
    assert not thread.is_alive()
    assert not loop.running
    assert loop.flush(0)
    loop.start()  # a stopped loop does not start again
    assert loop.thread is thread
    assert loop.stop(5)


def test_stop_before_start_closes_it() -> None:
    loop = EventfdLoop("test-events")
    assert loop.stop()
    assert loop.stop()  # twice is harmless
