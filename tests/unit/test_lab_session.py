"""The host runner's session and the lab's agent, talking over a socketpair instead of QEMU's port.

Everything but QEMU is real: the agent runs the command with subprocess, the session copies its output to
our stdout/stderr, and forwarded sockets carry real client connections.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.errors import MemvisorError
from memvisor.lab.inner import Agent, shell_status
from memvisor.lab.mux import StartRequest
from memvisor.lab.runner import LabSession, _Stopped, _StopRequest


@pytest.fixture
def fake_qemu() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def run_session(
    request: StartRequest,
    qemu: subprocess.Popen[bytes],
    tmp_path: Path,
    *,
    stop: _StopRequest | None = None,
    on_log: threading.Event | None = None,
) -> int:
    host_end, lab_end = socket.socketpair()
    agent = Agent(os.dup(lab_end.fileno()))
    lab_end.close()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    def log(message: str) -> None:
        if on_log is not None and message.startswith("forwarding"):
            on_log.set()

    session = LabSession(
        request, request.forwards, host_end, qemu, tmp_path / "console.log", forward_stdin=False, log=log
    )
    try:
        return session.run(stop or _StopRequest())
    finally:
        host_end.close()
        thread.join(timeout=10)


def test_streams_and_status(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes], capfd: pytest.CaptureFixture[str]
) -> None:
    request = StartRequest(
        argv=["sh", "-c", "echo out; echo err >&2; echo $LAB_TEST; exit 3"],
        cwd=str(tmp_path),
        env={"PATH": os.environ["PATH"], "LAB_TEST": "from-env"},
    )
    assert run_session(request, fake_qemu, tmp_path) == 3
    captured = capfd.readouterr()
    assert captured.out == "out\nfrom-env\n"
    assert captured.err == "err\n"


def test_large_output_arrives_whole(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes], capfd: pytest.CaptureFixture[str]
) -> None:
    request = StartRequest(
        argv=[sys.executable, "-c", "import sys; sys.stdout.write('x' * 3_000_000 + 'end')"],
        cwd="/",
        env=dict(os.environ),
    )
    assert run_session(request, fake_qemu, tmp_path) == 0
    out = capfd.readouterr().out
    assert len(out) == 3_000_003 and out.endswith("xend")


def test_a_missing_command_exits_127(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes], capfd: pytest.CaptureFixture[str]
) -> None:
    request = StartRequest(argv=["/nonexistent/tool"], cwd="/", env={})
    assert run_session(request, fake_qemu, tmp_path) == 127
    assert "cannot run /nonexistent/tool" in capfd.readouterr().err


def test_a_missing_working_folder_is_a_lab_error(tmp_path: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    request = StartRequest(argv=["true"], cwd=str(tmp_path / "absent"), env={"PATH": os.environ["PATH"]})
    with pytest.raises(MemvisorError, match="working folder .*absent does not exist in the lab"):
        run_session(request, fake_qemu, tmp_path)


def test_sigterm_reaches_the_command(tmp_path: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    stop = _StopRequest()
    request = StartRequest(argv=["sleep", "30"], cwd="/", env={"PATH": os.environ["PATH"]})
    timer = threading.Timer(0.5, stop.handle, args=(signal.SIGINT, None))
    timer.start()
    started = time.monotonic()
    assert run_session(request, fake_qemu, tmp_path, stop=stop) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10


def test_qemu_dying_ends_the_session(tmp_path: Path, fake_qemu: subprocess.Popen[bytes]) -> None:
    request = StartRequest(argv=["sleep", "30"], cwd="/", env={"PATH": os.environ["PATH"]})
    threading.Timer(0.3, fake_qemu.kill).start()
    with pytest.raises(_Stopped):
        run_session(request, fake_qemu, tmp_path)


ECHO_SERVER = r"""
import os, socket, sys, threading
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(4)
def serve(conn, number):
    conn.sendall(b"hello %d\n" % number)
    while data := conn.recv(4096):
        conn.sendall(data.upper())
    conn.close()
threads = []
for number in range(2):
    conn, _ = server.accept()
    thread = threading.Thread(target=serve, args=(conn, number))
    thread.start()
    threads.append(thread)
for thread in threads:
    thread.join()
"""


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def test_forwarded_socket_serves_two_clients_at_once(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    path = str(tmp_path / "echo.sock")
    request = StartRequest(argv=[sys.executable, "-c", ECHO_SERVER, path], cwd="/", env={}, forwards=[path])
    listening = threading.Event()
    results: dict[str, object] = {}
    eofs: list[bytes] = []

    def clients() -> None:
        try:
            assert listening.wait(10)
            first, second = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
            first.connect(path)
            second.connect(path)  # both open at once, each with its own connection inside
            greetings = {_read_line(first), _read_line(second)}
            first.sendall(b"abc\n")
            second.sendall(b"def\n")
            results["echo"] = (_read_line(first), _read_line(second))
            results["greetings"] = greetings
            for client in (first, second):
                client.shutdown(socket.SHUT_WR)  # a half close: the reply must still arrive
                eofs.append(client.recv(10))
                client.close()
        except Exception as error:  # reported by the main thread
            results["error"] = error

    thread = threading.Thread(target=clients)
    thread.start()
    assert run_session(request, fake_qemu, tmp_path, on_log=listening) == 0
    thread.join(10)
    assert "error" not in results, results
    assert results["greetings"] == {b"hello 0\n", b"hello 1\n"}
    assert results["echo"] == (b"ABC\n", b"DEF\n")
    assert eofs == [b"", b""]
    assert not os.path.exists(path)  # the runner removes its socket when the lab ends


def test_shell_status() -> None:
    assert shell_status(0) == 0
    assert shell_status(3) == 3
    assert shell_status(-signal.SIGKILL) == 128 + 9


LAST_WORD_SERVER = r"""
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(1)
conn, _ = server.accept()
conn.recv(100)
conn.sendall(b"bye\n")  # and exit at once, as a VMM does after replying to quit
"""


def test_a_reply_sent_just_before_exit_reaches_the_client(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    path = str(tmp_path / "q.sock")
    request = StartRequest(
        argv=[sys.executable, "-c", LAST_WORD_SERVER, path], cwd="/", env={}, forwards=[path]
    )
    listening = threading.Event()
    replies: list[bytes] = []

    def client() -> None:
        if listening.wait(10):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.sendall(b"quit\n")
            replies.append(_read_line(sock))
            sock.close()

    thread = threading.Thread(target=client)
    thread.start()
    assert run_session(request, fake_qemu, tmp_path, on_log=listening) == 0
    thread.join(10)
    assert replies == [b"bye\n"]


def test_output_to_a_replaced_stdout_is_text(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    request = StartRequest(argv=["sh", "-c", "echo captured"], cwd="/", env={"PATH": os.environ["PATH"]})
    assert run_session(request, fake_qemu, tmp_path) == 0
    assert capsys.readouterr().out == "captured\n"
