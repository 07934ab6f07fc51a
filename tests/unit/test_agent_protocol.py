"""The host side of the guest agent protocol (memvisor.vmm.agent) and console panic detection (vmm.console).

A fake guest answers the host's RUN lines the way memvisor/guest/agent.sh does (busybox base64 wraps at 76
characters, one `<id> O` line per wrapped line), in chunks that split lines anywhere, from its own thread.
"""

import base64
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from memvisor.errors import MemvisorError
from memvisor.vmm.agent import MAX_LINE, AgentTimeout, ExecResult, GuestAgent
from memvisor.vmm.console import Console

RUN_RE = re.compile(rb"^RUN (\d+) ([A-Za-z0-9+/=]*)\n$")


def wrapped_base64(data: bytes) -> list[bytes]:
    """`base64 FILE` as busybox prints it: 76 characters a line, nothing for an empty file."""
    text = base64.b64encode(data)
    return [text[i : i + 76] for i in range(0, len(text), 76)]


def answer_lines(ident: int, stdout: bytes, stderr: bytes, status: int) -> bytes:
    lines = [b"%d O %s" % (ident, line) for line in wrapped_base64(stdout)]
    lines += [b"%d E %s" % (ident, line) for line in wrapped_base64(stderr)]
    lines.append(b"%d X %d" % (ident, status))
    return b"".join(line + b"\n" for line in lines)


def chunks(data: bytes, generator: random.Random) -> Iterator[bytes]:
    position = 0
    while position < len(data):
        size = generator.randint(1, 40)
        yield data[position : position + size]
        position += size


class FakeGuest:
    """Reads what the host sends from a queue on its own thread and answers with `behaviour(command)`."""

    def __init__(
        self, behaviour: Callable[[str], tuple[bytes, bytes, int]] | None = None, seed: int = 0
    ) -> None:
        self.received: queue.Queue[bytes | None] = queue.Queue()
        self.agent = GuestAgent(self.received.put)
        self.behaviour = behaviour or (lambda command: (b"", b"", 0))
        self.commands: list[str] = []
        self.random = random.Random(seed)
        self.hold = threading.Event()  # set: swallow RUN lines without answering
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def boot(self) -> None:
        self.feed(b"MVAGENT READY\r\n")

    def feed(self, data: bytes) -> None:
        for piece in chunks(data, self.random):
            self.agent.on_output(piece)

    def _serve(self) -> None:
        while (line := self.received.get()) is not None:
            match = RUN_RE.match(line)
            if match is None:
                continue
            command = base64.b64decode(match.group(2)).decode()
            self.commands.append(command)
            if self.hold.is_set():
                continue
            stdout, stderr, status = self.behaviour(command)
            self.feed(answer_lines(int(match.group(1)), stdout, stderr, status))

    def stop(self) -> None:
        self.received.put(None)
        self.thread.join(5)


@pytest.fixture
def guest() -> Iterator[FakeGuest]:
    def shell(command: str) -> tuple[bytes, bytes, int]:
        if command.startswith("echo "):
            return command[5:].encode() + b"\n", b"", 0
        if command.startswith("exit "):
            return b"", b"", int(command[5:])
        if command == "big":
            return bytes(range(256)) * 400, b"warning: big\n" * 50, 3
        return b"", f"sh: {command}: not found\n".encode(), 127

    fake = FakeGuest(shell)
    yield fake
    fake.stop()


def test_ready_line(guest: FakeGuest) -> None:
    assert not guest.agent.ready
    guest.feed(b"booting...\nMVAGENT REA")
    assert not guest.agent.ready
    guest.feed(b"DY\n")
    assert guest.agent.ready
    guest.agent.wait_ready(0)


def test_exec_output_and_status(guest: FakeGuest) -> None:
    guest.boot()
    assert guest.agent.exec("echo hello world", timeout=10) == ExecResult(0, b"hello world\n", b"")
    assert guest.agent.exec("exit 42", timeout=10) == ExecResult(42, b"", b"")
    result = guest.agent.exec("nosuch", timeout=10)
    assert (result.status, result.stdout, result.stderr) == (127, b"", b"sh: nosuch: not found\n")
    assert guest.commands == ["echo hello world", "exit 42", "nosuch"]


def test_exec_large_binary_output_over_many_lines(guest: FakeGuest) -> None:
    guest.boot()
    result = guest.agent.exec("big", timeout=10)
    assert result == ExecResult(3, bytes(range(256)) * 400, b"warning: big\n" * 50)


def test_exec_from_several_threads_is_serialised(guest: FakeGuest) -> None:
    guest.boot()
    results: dict[int, ExecResult] = {}

    def worker(index: int) -> None:
        results[index] = guest.agent.exec(f"echo {index}", timeout=10)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert {index: result.stdout for index, result in results.items()} == {i: b"%d\n" % i for i in range(8)}


def test_exec_command_is_sent_as_base64(guest: FakeGuest) -> None:
    guest.boot()
    tricky = "printf '%s\\n' \"a b\" | tr a-z A-Z; echo $((1+2)) # ünïcode\n"
    guest.agent.exec(tricky, timeout=10)
    assert guest.commands[-1] == tricky


def test_exec_waits_for_ready(guest: FakeGuest) -> None:
    results: list[ExecResult] = []
    thread = threading.Thread(target=lambda: results.append(guest.agent.exec("echo late", timeout=10)))
    thread.start()
    thread.join(timeout=0.2)
    assert thread.is_alive() and not results and guest.commands == []  # blocked until READY
    guest.boot()
    thread.join(10)
    assert results == [ExecResult(0, b"late\n", b"")]


def test_garbled_lines_are_ignored() -> None:
    sent: list[bytes] = []
    agent = GuestAgent(sent.append)
    agent.on_output(b"MVAGENT READY\n")
    done: list[ExecResult] = []
    thread = threading.Thread(target=lambda: done.append(agent.exec("x", timeout=10)))
    thread.start()
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    ident = int(sent[0].split()[1])
    garbage = [
        b"",
        b"\x00\xff\xfe garbage",
        b"X",
        b"%d" % ident,
        b"%d O !!!!not base64" % ident,
        b"%d O QUJD" % ident,  # "ABC", valid
        b"%d E ====" % ident,
        b"%d X" % ident,
        b"%d X notanumber" % ident,
        b"%d Q whatever" % ident,
        b"%d ERR unknown" % ident,
        b"999 X 0",  # somebody else's id
        b"-1 X 0",
        b"9" * 5000 + b" X 0",  # an id too long to be a number
        b"MVAGENT READYX",
        b"%d X 7" % ident,
    ]
    agent.on_output(b"\n".join(garbage) + b"\n")
    thread.join(10)
    assert done == [ExecResult(7, b"ABC", b"")]


def test_random_bytes_from_the_guest_never_raise() -> None:
    agent = GuestAgent(lambda data: None)
    generator = random.Random(7)
    for _ in range(300):
        agent.on_output(bytes(generator.randrange(256) for _ in range(generator.randrange(200))))
        agent.on_output(generator.choice([b"1 X 1\n", b"1 O \xff\n", b"\r\n", b"MVAGENT READY\n"]))


def test_a_line_that_never_ends_is_dropped() -> None:
    agent = GuestAgent(lambda data: None)
    for _ in range(MAX_LINE // 4096 + 2):
        agent.on_output(b"A" * 4096)
    assert len(agent._buffer) <= MAX_LINE
    agent.on_output(b"\nMVAGENT READY\n")
    assert agent.ready


def test_abort_wakes_waiters_with_the_message(guest: FakeGuest) -> None:
    guest.boot()
    guest.hold.set()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            guest.agent.exec("sleep 1000", timeout=30)
        except MemvisorError as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    while not guest.commands:
        time.sleep(0.01)
    guest.agent.abort("the guest kernel panicked: Attempted to kill init!")
    thread.join(5)
    assert not thread.is_alive()
    assert [str(error) for error in errors] == ["the guest kernel panicked: Attempted to kill init!"]
    with pytest.raises(MemvisorError, match="panicked"):
        guest.agent.exec("echo after", timeout=1)


def test_abort_wakes_wait_ready() -> None:
    agent = GuestAgent(lambda data: None)
    threading.Timer(0.1, agent.abort, args=("the guest powered off",)).start()
    started = time.monotonic()
    with pytest.raises(MemvisorError, match="the guest powered off"):
        agent.wait_ready(30)
    assert time.monotonic() - started < 5


def test_restart_fails_a_pending_command(guest: FakeGuest) -> None:
    guest.boot()
    guest.hold.set()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            guest.agent.exec("reboot -f", timeout=30)
        except MemvisorError as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    while not guest.commands:
        time.sleep(0.01)
    guest.agent.reset()
    assert not guest.agent.ready
    guest.feed(b"[    0.000000] Linux version 6.1\nMVAGENT READY\n")
    thread.join(5)
    assert [str(error) for error in errors] == ["the guest restarted while the command was running"]
    guest.hold.clear()
    assert guest.agent.exec("echo again", timeout=10).stdout == b"again\n"


def test_reset_drops_a_half_line(guest: FakeGuest) -> None:
    guest.feed(b"MVAGENT REA")
    guest.agent.reset()
    guest.feed(b"DY\n")
    assert not guest.agent.ready


def test_exec_timeout(guest: FakeGuest) -> None:
    guest.boot()
    guest.hold.set()
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match="did not finish within .* raise --timeout"):
        guest.agent.exec("sleep 1000", timeout=0.3)
    assert 0.25 < time.monotonic() - started < 5
    guest.feed(b"1 X 0\n")  # a late answer for the abandoned command is ignored
    guest.hold.clear()
    assert guest.agent.exec("echo next", timeout=10).stdout == b"next\n"


def test_ready_timeout() -> None:
    agent = GuestAgent(lambda data: None)
    with pytest.raises(AgentTimeout, match="did not start within .*console log"):
        agent.wait_ready(0.1)
    with pytest.raises(AgentTimeout):
        agent.exec("true", timeout=0.1)


def test_poweroff_and_ping_lines() -> None:
    sent: list[bytes] = []
    agent = GuestAgent(sent.append)
    agent.poweroff()
    assert sent == [b"POWEROFF\n"]


# --- console panic detection -------------------------------------------------------------------------------

PANIC = b"[    1.234567] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n"


class ConsoleCapture:
    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.panics: list[str] = []
        self.console = Console(write_fd, self.panics.append)
        self.write_fd = write_fd

    def output(self) -> bytes:
        try:
            return os.read(self.read_fd, 1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def capture() -> Iterator[ConsoleCapture]:
    console = ConsoleCapture()
    yield console
    console.close()


@pytest.mark.parametrize("split", [1, 3, 7, 28, 40, len(PANIC) - 1])
def test_panic_split_across_writes(capture: ConsoleCapture, split: int) -> None:
    text = (
        b"[    1.0] Run /init as init process\r\n"
        + PANIC
        + b"[    1.3] ---[ end Kernel panic - not syncing: x ]---\r\n"
    )
    for start in range(0, len(text), split):
        capture.console.write(text[start : start + split])
    assert capture.panics == ["VFS: Unable to mount root fs on unknown-block(0,0)"]
    assert capture.console.panicked
    assert capture.output() == text, "the console bytes pass through unchanged"


def test_panic_split_at_every_position() -> None:
    for position in range(len(PANIC)):
        panics: list[str] = []
        with open(os.devnull, "wb") as null:
            console = Console(null.fileno(), panics.append)
            console.write(PANIC[:position])
            assert panics == []
            console.write(PANIC[position:])
        assert panics == ["VFS: Unable to mount root fs on unknown-block(0,0)"], position


def test_no_panic_in_ordinary_output(capture: ConsoleCapture) -> None:
    capture.console.write(b"Kernel panic - not syncing is a phrase\nkernel panic - not syncing: lowercase\n")
    capture.console.write(b"Kernel panic - not syncing: no newline yet")
    assert capture.panics == [] and not capture.console.panicked


def test_panic_after_a_long_line_without_newline() -> None:
    panics: list[str] = []
    with open(os.devnull, "wb") as null:
        console = Console(null.fileno(), panics.append)
        for _ in range(25):
            console.write(b"x" * 4000)
            assert len(console._line) <= 4096, "a line without end is not hoarded"
        console.write(b"\n" + PANIC)
    assert panics == ["VFS: Unable to mount root fs on unknown-block(0,0)"]


def test_closed_console_keeps_detecting() -> None:
    panics: list[str] = []
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    console = Console(write_fd, panics.append)  # a closed descriptor: writes fail with EBADF
    console.write(PANIC)
    assert panics == ["VFS: Unable to mount root fs on unknown-block(0,0)"]
