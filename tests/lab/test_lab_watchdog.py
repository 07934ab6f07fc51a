"""The lab never waits forever (issue 13): a deadline, a wedged lab, a wedged guest and SIGTERM all end it
on time, with a diagnosis. Each test boots one lab; run them on the host: .venv/bin/pytest tests/lab."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.environ.get("MEMVISOR_IN_LAB") == "1", reason="a lab does not nest inside a lab"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs Debian's qemu-system-x86"),
]

REPO = Path(__file__).resolve().parents[2]
# The lab's own start (about 15 s here) and the diagnosis (up to about 35 s) on top of each limit.
OVERHEAD = 120
HEARTBEAT = 20


def allowed(limit: float, stderr: str) -> float:
    """`limit` plus, when the lab did not start the first time and was started again (it says "trying once
    more"), the time that first attempt was given: these tests time the deadline, not the lab's boot."""
    from memvisor.lab.runner import BOOT_TIMEOUT

    return limit + (BOOT_TIMEOUT if "trying once more" in stderr else 0)


def memvisor(*args: str, env: dict[str, str] | None = None, timeout: float = 400) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip
    return result, time.monotonic() - started


def kept_folder(stderr: str) -> Path:
    match = re.search(r"full logs: (\S+)", stderr)
    assert match, stderr
    return Path(match.group(1))


def test_the_deadline_ends_the_command_with_a_diagnosis() -> None:
    result, took = memvisor("lab", "--memory", "2G", "--timeout", "15", "--", "sleep", "600")
    print(f"took {took:.1f} s:\n{result.stderr}")  # the diagnosis as a user sees it (pytest -s)
    assert result.returncode == 125, result.stderr
    assert took < allowed(15 + OVERHEAD, result.stderr)
    assert "`sleep 600` did not end within its deadline of 15 s" in result.stderr
    folder = kept_folder(result.stderr)
    diagnosis = (folder / "agent-diagnosis.txt").read_text()
    assert "sleep 600" in diagnosis and "lab kernel log" in diagnosis
    assert "RIP=" in (folder / "registers.txt").read_text()
    shutil.rmtree(folder)


def test_a_wedged_lab_is_caught_by_the_heartbeat_and_explained() -> None:
    # Real-time busy loops on both lab CPUs with RT throttling off: the lab's kernel runs nothing else.
    wedge = ("echo -1 > /proc/sys/kernel/sched_rt_runtime_us; "
             "for cpu in 1 2; do chrt -f 99 sh -c 'while :; do :; done' & done; wait")  # fmt: skip
    result, took = memvisor("lab", "--memory", "2G", "--", "sh", "-c", wedge,
                            env={"MEMVISOR_LAB_HEARTBEAT_TIMEOUT": str(HEARTBEAT)})  # fmt: skip
    print(f"took {took:.1f} s:\n{result.stderr}")
    assert result.returncode == 125, result.stderr
    assert took < allowed(HEARTBEAT + OVERHEAD, result.stderr)
    assert "the lab stopped answering: no heartbeat" in result.stderr
    assert "the agent inside the lab did not answer" in result.stderr
    folder = kept_folder(result.stderr)
    console = (folder / "lab-console.log").read_text(errors="replace")
    assert "NMI" in console  # the NMI from QEMU's monitor became a panic with the CPUs' backtraces
    shutil.rmtree(folder)


def test_a_lab_kernel_panic_under_the_command_is_told_by_its_cause_with_its_own_status() -> None:
    from memvisor.errors import EXIT_LAB_CRASHED

    # The lab's kernel crashes on purpose (sysrq c): `memvisor lab` must say so, with the panic's own line, and
    # exit EXIT_LAB_CRASHED (scripts/guest-tests reruns the unfinished guest tests on that status only).
    result, took = memvisor("lab", "--memory", "2G", "--", "sh", "-c", "sleep 1; echo c > /proc/sysrq-trigger; sleep 60")
    print(f"took {took:.1f} s:\n{result.stderr}")
    assert result.returncode == EXIT_LAB_CRASHED, result.stderr
    assert "the lab's kernel panicked" in result.stderr and "sysrq triggered crash" in result.stderr
    match = re.search(r"full console: (\S+)", result.stderr)
    assert match, result.stderr
    assert "Kernel panic" in Path(match.group(1)).read_text(errors="replace")
    shutil.rmtree(Path(match.group(1)).parent)


def test_sigterm_ends_the_lab_within_seconds_and_leaves_nothing() -> None:
    # A temp folder of its own: other processes on the machine (unit tests, other labs) make memvisor-lab-*
    # folders in /tmp too. Short, for the lab's UNIX socket paths.
    private = Path(tempfile.mkdtemp(prefix="mvsig-", dir="/tmp"))
    process = subprocess.Popen([sys.executable, "-m", "memvisor", "lab", "-v", "--memory", "2G", "--", "sleep", "600"],
                               cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(private)})  # fmt: skip
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "lab agent ready" in line:
            break
    time.sleep(2)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    status = process.wait(timeout=30)
    took = time.monotonic() - started
    print(f"ended {took:.1f} s after SIGTERM:\n{rest}")
    assert took < 8, rest
    assert status == 128 + signal.SIGTERM
    assert "SIGTERM: stopping `sleep 600` in the lab" in rest
    left = sorted(path.name for path in private.iterdir())
    assert left == [], "the lab left these behind in its temp folder"
    private.rmdir()


def test_a_wedged_guest_ends_memvisor_run_on_time() -> None:
    # The guest's agent is stopped by the command it runs: no answer ever comes back.
    stop_agent = ("for p in /proc/[0-9]*; do grep -q agent.sh $p/cmdline 2>/dev/null && kill -STOP ${p#/proc/}; "
                  "done; sleep 600")  # fmt: skip
    result, took = memvisor("run", "--lab", "on", "--memory", "256M", "--exec", stop_agent, "--timeout", "20")
    print(f"took {took:.1f} s:\n{result.stderr}")
    assert result.returncode == 125, result.stderr
    assert took < allowed(20 + 240, result.stderr), result.stderr  # the lab's and the guest's boots, then 20 s
    assert "did not finish within 20 s" in result.stderr
