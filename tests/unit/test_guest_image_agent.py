"""The guest agent (agent.sh) speaking its protocol over a pseudo-terminal, run by the host's busybox sh.

The pty stands in for /dev/ttyS1 (MVAGENT_PORT points the agent at it). POWEROFF is never sent here: the
static busybox runs `poweroff` as a built-in applet whatever PATH says, and that would stop this machine.
The QEMU check (tests/guest/manual_qemu_agent_check.py) covers POWEROFF in a real guest.
"""

from __future__ import annotations

import base64
import glob
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.guest.image import AGENT_SCRIPT

BUSYBOX = shutil.which("busybox") or ("/bin/busybox" if Path("/bin/busybox").exists() else None)
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (Debian busybox-static)")


class PtyAgent:
    """The agent on the slave side of a pty; the test talks on the master side."""

    def __init__(self) -> None:
        # The test keeps its own slave fd open until the end: a pty whose slave was never opened, or was
        # closed by everyone, reads as EIO on the master.
        self.master, self.slave = os.openpty()
        slave_path = os.ttyname(self.slave)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MVAGENT_PORT": slave_path}
        self.process = subprocess.Popen(
            [str(BUSYBOX), "sh", str(AGENT_SCRIPT)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.buffer = b""

    def line(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line from the agent (have {self.buffer!r})")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                self.buffer += os.read(self.master, 65536)
        raw, self.buffer = self.buffer.split(b"\n", 1)
        return raw.decode()

    def send(self, text: str) -> None:
        data = text.encode() + b"\n"
        while data:
            written = os.write(self.master, data)
            data = data[written:]

    def run(self, ident: str, command: str) -> tuple[bytes, bytes, int]:
        self.send(f"RUN {ident} {base64.b64encode(command.encode()).decode()}")
        out, err = [], []
        while True:
            who, kind, *rest = self.line().split(" ", 2)
            assert who == ident
            if kind == "O":
                out.append(rest[0] if rest else "")
            elif kind == "E":
                err.append(rest[0] if rest else "")
            else:
                assert kind == "X", kind
                return base64.b64decode("".join(out)), base64.b64decode("".join(err)), int(rest[0])

    def close(self) -> None:
        os.close(self.master)  # the agent's read fails and it ends its loop (it powers off only on POWEROFF)
        os.close(self.slave)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def agent() -> Iterator[PtyAgent]:
    started = PtyAgent()
    try:
        assert started.line() == "MVAGENT READY"
        yield started
    finally:
        started.close()


def test_ping_and_run(agent: PtyAgent) -> None:
    agent.send("PING 42")
    assert agent.line() == "42 PONG"
    out, err, status = agent.run("a1", "echo to-out; echo to-err >&2; exit 3")
    assert (out, err, status) == (b"to-out\n", b"to-err\n", 3)


def test_output_edge_cases(agent: PtyAgent) -> None:
    assert agent.run("e1", "true") == (b"", b"", 0)
    assert agent.run("e2", r"printf '\000\001\377\r\n'") == (b"\x00\x01\xff\r\n", b"", 0)
    assert agent.run("e3", "cat; echo after") == (b"after\n", b"", 0)  # stdin is /dev/null
    assert agent.run("e4", "pwd") == (b"/\n", b"", 0)
    assert agent.run("e5", "kill -9 $$")[2] == 137
    out, _, status = agent.run("e6", "head -c 51200 /dev/zero | tr '\\000' 'z'")
    assert (out, status) == (b"z" * 51200, 0)


def test_command_text_is_passed_verbatim(agent: PtyAgent) -> None:
    command = "printf '%s|' \"a  b\" '$HOME' '*' \"$(echo sub)\"; echo"
    assert agent.run("q1", command) == (b"a  b|$HOME|*|sub|\n", b"", 0)
    long_word = "x" * 20000
    assert agent.run("q2", f"echo {long_word} | wc -c") == (b"20001\n", b"", 0)


def test_command_gets_oom_score_adj_zero(agent: PtyAgent) -> None:
    out, _, status = agent.run("o1", "cat /proc/self/oom_score_adj")
    assert (out, status) == (b"0\n", 0)


def test_unknown_and_malformed_requests(agent: PtyAgent) -> None:
    agent.send("FROB 7 extra words")
    assert agent.line() == "7 ERR unknown"
    agent.send("FROB")
    assert agent.line() == "- ERR unknown"
    agent.send("PING")
    assert agent.line() == "- ERR unknown"
    agent.send("RUN bad/id Zm9v")
    assert agent.line() == "- ERR unknown"
    agent.send("RUN x1 Zm9v too many")
    assert agent.line() == "x1 ERR unknown"
    agent.send("")  # empty lines are ignored
    agent.send("PING 8\r")  # a trailing CR is tolerated
    assert agent.line() == "8 PONG"


def test_temporary_files_are_removed(agent: PtyAgent) -> None:
    before = set(glob.glob("/tmp/mvagent.*"))
    agent.run("t1", "echo hello; echo oops >&2")
    assert set(glob.glob("/tmp/mvagent.*")) <= before
