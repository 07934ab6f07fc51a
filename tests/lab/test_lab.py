"""The lab for real: QEMU TCG with nested SVM, the host's files read-only, shares, forwards, /dev/kvm.

Each test boots one lab (several seconds under TCG). Run them on the host, not inside a lab:
    .venv/bin/pytest tests/lab
(tests/guest runs inside one lab; these start labs, so they live apart and run on the host.)
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.environ.get("MEMVISOR_IN_LAB") == "1", reason="a lab does not nest inside a lab"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs Debian's qemu-system-x86"),
]

REPO = Path(__file__).resolve().parents[2]


def lab(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "memvisor.lab.cli", "--memory", "2G", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_streams_and_exit_status_pass_through() -> None:
    result = lab("--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_dev_kvm_inside_is_hardware_speed_kvm() -> None:
    probe = (
        "import fcntl, os\n"
        "from memvisor.lab.detect import kvm_status\n"
        "fd = os.open('/dev/kvm', os.O_RDWR)\n"
        "print(fcntl.ioctl(fd, 0xAE00), kvm_status().kind, os.path.exists('/sys/module/kvm_amd'))\n"  # KVM_GET_API_VERSION
    )
    result = lab("--", sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"12", b"hardware", b"True"]


def test_root_is_read_only_and_shares_are_writable_with_shared_mappings(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(8192))
    script = (
        "import mmap, os, sys\n"
        f"folder = {str(tmp_path)!r}\n"
        "open(os.path.join(folder, 'written.txt'), 'w').write('from the lab')\n"
        "with open(os.path.join(folder, 'data.bin'), 'r+b') as f:\n"
        "    m = mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED)\n"  # needs 9p cache=mmap
        "    m[4096:4100] = b'mmap'\n"
        "    m.flush(); m.close()\n"
        "try:\n"
        "    open('/usr/lab-write-test', 'w')\n"
        "except OSError as e:\n"
        "    print('root:', e.strerror)\n"
    )
    result = lab("--share", str(tmp_path), "--", sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"root: Read-only file system\n"
    assert (tmp_path / "written.txt").read_text() == "from the lab"
    assert data.read_bytes()[4096:4100] == b"mmap"


def test_stdin_reaches_the_command() -> None:
    payload = os.urandom(200_000)
    result = lab("--stdin", "--", "sha256sum", stdin=payload)
    assert result.returncode == 0, result.stderr
    import hashlib

    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_a_lab_that_dies_is_a_one_line_error() -> None:
    result = lab("--", "sh", "-c", "echo o > /proc/sysrq-trigger; sleep 30")
    assert result.returncode == 125
    message = result.stderr.decode()
    assert message.startswith("memvisor: the lab stopped before the command finished")
    assert message.count("\n") == 1


ECHO_SERVER = r"""
import socket, sys, threading
def serve(conn, number):
    conn.sendall(b"hello %d\n" % number)
    while data := conn.recv(4096):
        conn.sendall(data.upper())
    conn.close()
def listen(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    workers = []
    for number in range(2):
        conn, _ = server.accept()
        workers.append(threading.Thread(target=serve, args=(conn, number)))
        workers[-1].start()
    for worker in workers:
        worker.join()
servers = [threading.Thread(target=listen, args=(path,)) for path in sys.argv[1:]]
for server in servers: server.start()
for server in servers: server.join()
"""


def _connect(path: str, lab_process: subprocess.Popen[bytes], timeout: float = 120) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and lab_process.poll() is None:
        client = socket.socket(socket.AF_UNIX)
        try:
            client.connect(path)
            return client
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            time.sleep(0.1)
    raise AssertionError(f"{path} never accepted a connection")


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and (chunk := sock.recv(1)):
        data += chunk
    return data


def test_forwarded_sockets_serve_several_host_clients(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # the socket's folder is a read-write share: the hard case
    shared.mkdir()
    private = tmp_path / "private"  # not shared: the lab makes the folder in its own /tmp
    private.mkdir()
    paths = [str(shared / "echo.sock"), str(private / "echo.sock")]
    process = subprocess.Popen(
        [sys.executable, "-m", "memvisor.lab.cli", "--memory", "2G", "--share", str(shared)]
        + [arg for path in paths for arg in ("--forward", path)]
        + ["--", sys.executable, "-c", ECHO_SERVER, *paths],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        for path in paths:
            first = _connect(path, process)
            second = _connect(path, process)  # two clients at once, each with its own greeting
            assert {_line(first), _line(second)} == {b"hello 0\n", b"hello 1\n"}
            first.sendall(b"one\n")
            second.sendall(b"two\n")
            assert (_line(first), _line(second)) == (b"ONE\n", b"TWO\n")
            for client in (first, second):
                client.shutdown(socket.SHUT_WR)
                assert client.recv(10) == b""
                client.close()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not any(os.path.exists(path) for path in paths)


def test_ctrl_c_stops_the_command_and_the_lab() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memvisor.lab.cli",
            "--memory",
            "2G",
            "--",
            "sh",
            "-c",
            "echo started; sleep 300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        threading.Timer(0, process.send_signal, args=(2,)).start()  # SIGINT, as Ctrl-C
        assert process.wait(timeout=30) == 128 + 15  # the command got SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
