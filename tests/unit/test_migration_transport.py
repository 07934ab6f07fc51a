"""Live migration over real local sockets (memvisor/migration/transport.py, incoming.py, job.py): tcp: on
loopback, unix:, `--incoming defer` + migrate-incoming, a destination that gives up, and migrate_cancel while the
source is blocked sending."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memvisor.control.machine_api import MachineError
from memvisor.errors import MemvisorError
from memvisor.migration import stream
from memvisor.migration.incoming import IncomingListener, receive_live
from memvisor.migration.job import LiveMigrationJob
from memvisor.migration.source import MigrationParameters, SourceHooks
from memvisor.migration.stream import PAGE_SIZE, StreamError
from memvisor.migration.transport import accept, connect, listen, parse_uri
from memvisor.vmm.migration import IncomingSlot

from .migration_fakes import PAGES, FakeMachine, MiB, fake_machine_state


@pytest.fixture
def no_kvm_state(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_machine_state(monkeypatch)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def written(memory: int = 4 * MiB) -> FakeMachine:
    machine = FakeMachine(memory)
    for pfn in range(0, memory // PAGE_SIZE, 3):
        machine.guest_write(pfn, bytes([pfn % 251 + 1]) * PAGE_SIZE)
    return machine


class Job:
    """A LiveMigrationJob of `machine` with its resumes counted."""

    def __init__(self, machine: FakeMachine, params: MigrationParameters | None = None) -> None:
        self.machine = machine
        self.resumed = 0
        self.job = LiveMigrationJob(lambda: None, params or MigrationParameters(max_bandwidth=0))

    def start(self, uri: str) -> None:
        self.job.start(self.machine, uri, SourceHooks(), True, self._resume)

    def _resume(self) -> None:
        self.resumed += 1

    def finish(self) -> dict[str, Any]:
        self.job.wait(20)
        assert not self.job.running, "the migration did not end"
        return self.job.info()


@contextlib.contextmanager
def receiving(machine: FakeMachine, uri: str, give_up: Any = lambda: False) -> Iterator[list[Any]]:
    """The destination: listening once this yields, receiving in a thread; the outcome (True/False or the error)
    lands in the yielded list when the block ends."""
    listener = IncomingListener(uri)
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(listener.receive(machine, give_up))  # type: ignore[arg-type]
        except MemvisorError as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(20)
        assert not thread.is_alive(), "the destination did not end"


def same_ram(dst: FakeMachine, src: FakeMachine) -> None:
    assert [pfn for pfn in range(PAGES) if dst.page(pfn) != src.page(pfn)] == []


@pytest.mark.parametrize("host", ["127.0.0.1", ""], ids=["loopback", "all-interfaces"])
def test_a_migration_over_tcp(no_kvm_state: None, host: str) -> None:
    src, dst = written(), FakeMachine()
    port = free_port()
    with receiving(dst, f"tcp:{host}:{port}") as outcome:
        job = Job(src)
        job.start(f"tcp:127.0.0.1:{port}")
        info = job.finish()
    assert outcome == [True] and info["status"] == "completed", (outcome, info)
    assert job.resumed == 0 and dst.loaded == {"fake-state": 0}
    same_ram(dst, src)
    listen(parse_uri(f"tcp:127.0.0.1:{port}")).close()  # the port is closed: the next destination may take it


def test_a_migration_over_a_unix_socket_replaces_a_stale_socket_file_and_removes_its_own(
    no_kvm_state: None, tmp_path: Path
) -> None:
    path = tmp_path / "mig.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left by an earlier destination that died
    stale.close()
    src, dst = written(), FakeMachine()
    with receiving(dst, f"unix:{path}") as outcome:
        job = Job(src)
        job.start(f"unix:{path}")
        info = job.finish()
    assert outcome == [True] and info["status"] == "completed"
    same_ram(dst, src)
    assert not path.exists()


def test_a_destination_that_gives_up_stops_listening_and_removes_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    stop = threading.Event()
    with receiving(FakeMachine(), f"unix:{path}", stop.is_set) as outcome:
        assert path.exists()
        stop.set()  # memvisor is ending (a signal) before any source came
    assert outcome == [False] and not path.exists()
    with pytest.raises(OSError):
        connect(parse_uri(f"unix:{path}"), timeout=1)


def test_listening_on_a_port_in_use_fails_naming_the_uri() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(MemvisorError, match=f"cannot listen on tcp:127.0.0.1:{port}: .*in use"):
            receive_live(FakeMachine(), f"tcp:127.0.0.1:{port}", lambda: True)  # type: ignore[arg-type]


def test_a_source_with_nothing_to_connect_to_fails_and_runs_on() -> None:
    job = Job(written())
    port = free_port()
    job.start(f"tcp:127.0.0.1:{port}")
    info = job.finish()
    assert info["status"] == "failed" and job.resumed == 1
    assert info["error-desc"].startswith(f"cannot connect to tcp:127.0.0.1:{port}: ")


def test_a_refusing_destination_over_tcp_fails_both_sides_naming_the_option(no_kvm_state: None) -> None:
    port = free_port()
    with receiving(FakeMachine(memory=8 * MiB), f"tcp:127.0.0.1:{port}") as outcome:
        job = Job(written())
        job.start(f"tcp:127.0.0.1:{port}")
        info = job.finish()
    assert info["status"] == "failed" and "--memory 4M" in info["error-desc"] and job.resumed == 1
    assert isinstance(outcome[0], MemvisorError) and "CONFIG.memory" in str(outcome[0])


def test_migrate_cancel_while_the_source_is_blocked_sending(no_kvm_state: None) -> None:
    """The destination takes the configuration, then reads nothing more: the source fills the socket buffers
    and blocks in send; migrate_cancel shuts the socket down, the job ends "cancelled" and the guest runs on."""
    src = written(32 * MiB)
    port = free_port()
    listener = listen(parse_uri(f"tcp:127.0.0.1:{port}"))
    job = Job(src)
    job.start(f"tcp:127.0.0.1:{port}")
    conn = accept(listener, lambda: False)
    assert conn is not None
    with listener, conn:
        stream.read_stream_header(conn)
        stream.read_record(conn, (stream.CONFIG,))
        conn.sendall(stream.json_record(stream.ACK, {"ok": True}))
        before, deadline = -1, time.monotonic() + 20
        while time.monotonic() < deadline:  # until the source stops making progress: blocked in send
            time.sleep(0.2)
            now = job.job.stats.transferred
            if now == before:
                break
            before = now
        assert job.job.status == "active" and before < 32 * MiB
        job.job.cancel()
        info = job.finish()
        assert info["status"] == "cancelled" and info["error-desc"] == "cancelled by migrate_cancel"
        assert job.resumed == 1
        with pytest.raises(StreamError):  # the destination sees the stream end, cut mid-record or between two
            while True:
                stream.read_record(conn)


def test_defer_then_migrate_incoming_listens_before_it_answers(no_kvm_state: None, tmp_path: Path) -> None:
    """`--incoming defer`: migrate-incoming opens the port before its reply (a source may connect at once) and
    receives in a thread; a port it cannot open is the reply's error, and a second try may follow (QEMU's)."""
    from memvisor.migration.incoming import deferred_listen

    src, dst = written(), FakeMachine()
    slot = IncomingSlot(lambda path: None, deferred_listen(dst, lambda: False))  # type: ignore[arg-type]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(MachineError, match="cannot listen on tcp:127.0.0.1:.*in use"):
            slot.migrate_incoming(f"tcp:127.0.0.1:{busy.getsockname()[1]}")
    path = tmp_path / "in.sock"
    slot.migrate_incoming(f"unix:{path}")
    with pytest.raises(MachineError, match="already been started"):
        slot.migrate_incoming(f"unix:{path}")
    job = Job(src)
    job.start(f"unix:{path}")  # no retry: the socket listens already
    info = job.finish()
    assert info["status"] == "completed", info
    assert slot.wait(lambda: False) is True and slot.error is None
    same_ram(dst, src)
    assert dst.loaded == {"fake-state": 0} and not os.path.exists(path)


def test_endpoints_print_as_uris_again() -> None:
    for uri in ("tcp:127.0.0.1:4444", "tcp:[::1]:5", "unix:/run/x.sock"):
        assert str(parse_uri(uri)) == uri
    assert str(parse_uri("tcp::4444")) == "tcp:0.0.0.0:4444"
