"""wait_for_qmp: "refused while starting" is "not yet" for memvisor's client and for qemu.qmp alike; real errors,
an exited VMM and the deadline end the wait with a message naming what it saw last."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from memvisor.control.client import QmpConnection
from memvisor.control.fake import FakeMachine
from memvisor.control.ready import QmpNotReady, is_not_yet, wait_for_qmp
from memvisor.control.server import QmpServer
from memvisor.errors import MemvisorError


@pytest.fixture
def sock_path() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="ready-", dir="/tmp")
    yield os.path.join(folder, "qmp.sock")
    shutil.rmtree(folder, ignore_errors=True)


class Running:
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def _bound_not_listening(path: str) -> socket.socket:
    """A socket file that refuses connections (bound, no listen): what a starting VMM shows for a moment."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    return sock


def _server_after(path: str, attempts: threading.Event, started: list[QmpServer]) -> threading.Thread:
    """Replace the refusing socket with a real QMP server once the client has been refused at least once."""

    def run() -> None:
        assert attempts.wait(10), "the client never tried"
        os.unlink(path)
        server = QmpServer(path, FakeMachine())
        server.start()
        started.append(server)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("client", ["memvisor", "qemu.qmp"])
def test_refused_while_starting_is_retried_until_the_server_answers(sock_path: str, client: str) -> None:
    refusing = _bound_not_listening(sock_path)
    refused = threading.Event()
    errors: list[BaseException] = []

    def connect(path: str) -> object:
        try:
            if client == "memvisor":
                return QmpConnection(path, timeout=5)
            qmp = QEMUMonitorProtocol(path)
            qmp.connect(negotiate=True)
            return qmp
        except Exception as error:
            errors.append(error)
            refused.set()
            raise

    started: list[QmpServer] = []
    thread = _server_after(sock_path, refused, started)
    try:
        connection = wait_for_qmp(sock_path, connect, timeout=20, process=Running(), interval=0.01)
        assert errors and all(is_not_yet(error) for error in errors)
        if client == "qemu.qmp":  # the library wraps the OSError in its own ConnectError, not an OSError
            assert not isinstance(errors[0], OSError)
        connection.close()  # type: ignore[attr-defined]
    finally:
        thread.join()
        refusing.close()
        for server in started:
            server.stop()


def test_a_missing_socket_is_not_yet_and_the_deadline_names_it(sock_path: str) -> None:
    ticks = iter(range(1000))
    with pytest.raises(QmpNotReady) as raised:
        wait_for_qmp(sock_path, QmpConnection, timeout=5, what="memvisor's QMP",
                     clock=lambda: float(next(ticks)), sleep=lambda _s: None)  # fmt: skip
    message = str(raised.value)
    assert "memvisor's QMP" in message and "within 5 s" in message and "ENOENT" in message


def test_a_refusing_socket_is_named_at_the_deadline(sock_path: str) -> None:
    refusing = _bound_not_listening(sock_path)
    ticks = iter(range(1000))
    try:
        with pytest.raises(QmpNotReady, match="ECONNREFUSED"):
            wait_for_qmp(sock_path, QmpConnection, timeout=3, clock=lambda: float(next(ticks)),
                         sleep=lambda _s: None)  # fmt: skip
    finally:
        refusing.close()


def test_a_real_error_ends_the_wait_at_once(sock_path: str) -> None:
    calls = []

    def connect(path: str) -> object:
        calls.append(path)
        raise MemvisorError("permission denied on it") from PermissionError(13, "Permission denied")

    with pytest.raises(MemvisorError, match="permission denied"):
        wait_for_qmp(sock_path, connect, timeout=60)
    assert len(calls) == 1


def test_an_exited_vmm_ends_the_wait_with_its_status(sock_path: str) -> None:
    process = Running()
    attempts = []

    def connect(path: str) -> object:
        attempts.append(path)
        process.returncode = 3  # it dies after the first refused attempt
        raise MemvisorError("nothing listens") from ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(QmpNotReady, match=r"exited with status 3 .*ECONNREFUSED"):
        wait_for_qmp(sock_path, connect, timeout=60, process=process, sleep=lambda _s: None)
    assert len(attempts) == 1
