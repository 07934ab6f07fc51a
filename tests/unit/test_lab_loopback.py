"""memvisor/lab/loopback.py: lo brought up in a fresh network namespace, as the lab's agent does at start."""

import os
import shutil
import subprocess
import sys

import pytest

from memvisor.lab.loopback import IFREQ, bring_loopback_up

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ifreq_is_the_kernels_40_bytes() -> None:
    assert IFREQ.size == 40  # struct ifreq on x86-64: a 16-byte name and a 24-byte union


def test_an_interface_that_does_not_exist_is_an_oserror() -> None:
    with pytest.raises(OSError):
        bring_loopback_up("nosuchif0")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="a new network namespace needs root")
def test_lo_comes_up_in_a_fresh_namespace_and_127_0_0_1_then_connects() -> None:
    script = (
        "import socket\n"
        "from memvisor.lab.loopback import bring_loopback_up\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "try:\n"
        "    socket.create_connection(server.getsockname(), timeout=2)\n"
        "    before = 'connected'\n"
        "except OSError as error:\n"
        "    before = error.__class__.__name__\n"
        "print(before, bring_loopback_up(), bring_loopback_up())\n"
        "socket.create_connection(server.getsockname(), timeout=2)\n"
        "print('connected')\n"
    )
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, check=False)  # fmt: skip
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.split()[1:] == ["True", "False"] and first.split()[0] != "connected" and second == "connected"
