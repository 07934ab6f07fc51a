"""Nothing in the lab waits forever: the heartbeat, the deadline, the diagnosis of a stuck lab.

The session talks to a real agent over a socketpair (as in test_lab_session.py) or to a silent peer that
plays a wedged lab; the QEMU monitor is a small fake HMP server on a UNIX socket.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.errors import EXIT_LAB_CRASHED, LabCrashed
from memvisor.lab import diagnose, inner, plan, postmortem, runner
from memvisor.lab.inner import Agent
from memvisor.lab.mux import CONTROL, Frame, Kind, StartRequest
from memvisor.lab.runner import LabSession, _StopRequest, _Stuck


@pytest.fixture
def fake_qemu() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def _request(*argv: str) -> StartRequest:
    return StartRequest(argv=list(argv), cwd="/", env={"PATH": os.environ["PATH"]})


def test_a_silent_lab_is_caught_by_the_heartbeat(fake_qemu, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(runner, "HEARTBEAT_TIMEOUT", 1.0)
    host_end, lab_end = socket.socketpair()
    lab_end.sendall(Frame(CONTROL, Kind.READY).encode())  # READY, then nothing: a wedged lab kernel
    session = LabSession(_request("true"), [], host_end, fake_qemu, tmp_path / "c.log", forward_stdin=False,
                         log=lambda m: None)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(_Stuck) as caught:
        session.run(_StopRequest())
    assert 1.0 <= time.monotonic() - started < 5
    assert "no heartbeat" in caught.value.reason and not caught.value.agent_alive
    assert session.ask_diagnosis(timeout=0.3) is None  # nobody answers DIAGNOSE either
    lab_end.close()
    host_end.close()


def test_heartbeats_keep_a_quiet_command_alive(fake_qemu, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(runner, "HEARTBEAT_TIMEOUT", 1.5)
    monkeypatch.setattr(inner, "HEARTBEAT_INTERVAL", 0.2)
    status, _ = _run_with_agent(_request("sleep", "3"), fake_qemu, tmp_path)
    assert status == 0


def test_the_deadline_ends_a_command_with_the_agents_diagnosis(fake_qemu, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sysrq: list[str] = []
    monkeypatch.setattr(diagnose, "sysrq", sysrq.append)  # not this machine's kernel log
    console = tmp_path / "guest-console.log"
    console.write_text("guest booted\nguest is spinning\n")
    # A stand-in for a wedged `memvisor run`: its command line names a console, so the diagnosis shows it.
    script = "import signal, time; signal.signal(signal.SIGUSR2, lambda *a: None); time.sleep(60)"
    request = _request(sys.executable, "-c", script, "-m", "memvisor", "run", "--console", str(console))
    started = time.monotonic()
    with pytest.raises(_Stuck) as caught:
        _run_with_agent(request, fake_qemu, tmp_path, timeout=1.0, diagnose_after=True)
    assert time.monotonic() - started < 20
    assert "deadline of 1 s" in caught.value.reason and caught.value.agent_alive
    text = caught.value.__notes__[0] if hasattr(caught.value, "__notes__") else ""
    assert "the command's processes" in text
    assert "guest is spinning" in text
    assert "== memvisor run" in text and "kernel stacks" in text
    assert sysrq == ["lw"]


def _run_with_agent(
    request: StartRequest,
    qemu: subprocess.Popen[bytes],
    tmp_path: Path,
    *,
    timeout: float | None = None,
    diagnose_after: bool = False,
) -> tuple[int, LabSession]:
    host_end, lab_end = socket.socketpair()
    agent = Agent(os.dup(lab_end.fileno()))
    lab_end.close()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    session = LabSession(request, [], host_end, qemu, tmp_path / "c.log", forward_stdin=False,
                         log=lambda m: None, timeout=timeout)  # fmt: skip
    try:
        return session.run(_StopRequest()), session
    except _Stuck as stuck:
        if diagnose_after:
            stuck.add_note(session.ask_diagnosis(timeout=20) or "")
        raise
    finally:
        if agent.process is not None and agent.process.poll() is None:
            os.killpg(agent.process.pid, 9)
        host_end.close()
        thread.join(timeout=10)


class _FakeMonitor:
    """A QEMU human monitor: a greeting, then one answer per command line, each ending in the prompt."""

    def __init__(self, path: Path, answers: dict[str, str]) -> None:
        self.commands: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.answers = answers
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with client:
                client.sendall(b"QEMU 7.2 monitor - type 'help' for more information\r\n(qemu) ")
                line = client.makefile("rb").readline().decode().strip()
                self.commands.append(line)
                echo = "".join(f"{line[: i + 1]}\x1b[K" + "\x1b[D" * (i + 1) for i in range(len(line)))  # as QEMU redraws
                client.sendall(f"{echo}\r\n{self.answers.get(line, '')}\r\n(qemu) ".encode())


def test_monitor_command_returns_the_answer_without_echo_or_prompt(tmp_path: Path) -> None:
    fake = _FakeMonitor(tmp_path / "m.sock", {"info registers -a": "CPU#0\r\nRIP=ffffffff81000000 RFL=00000246"})
    answer = postmortem.Monitor(tmp_path / "m.sock").command("info registers -a")
    assert answer == "CPU#0\nRIP=ffffffff81000000 RFL=00000246"
    assert fake.commands == ["info registers -a"]


def test_monitor_that_is_gone_gives_a_message_not_an_exception(tmp_path: Path) -> None:
    assert "did not answer" in postmortem.Monitor(tmp_path / "absent.sock", timeout=0.5).command("nmi")


def test_collect_keeps_the_logs_and_summarises_a_wedged_lab(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(postmortem, "SYSRQ_WAIT", 0.3)  # the fake lab prints nothing for the sysrq keys
    console = tmp_path / "console.log"
    console.write_text("Linux version 6.1\nmvlab: starting the agent\n")
    qemu_log = tmp_path / "qemu.log"
    qemu_log.write_text("")

    def nmi_panic() -> str:
        with console.open("a") as out:
            out.write("Kernel panic - not syncing: NMI: Not continuing\nNMI backtrace for cpu 1\n"
                      "RIP: 0010:kvm_vcpu_halt+0x12/0x40 [kvm]\nCall Trace:\n <TASK>\n"
                      " svm_vcpu_run+0x1a/0x100 [kvm_amd]\n vcpu_enter_guest+0x5/0x9 [kvm]\n")  # fmt: skip
        return ""

    fake = _FakeMonitor(tmp_path / "m.sock", {"info registers -a": "CPU#0\nRIP=ffffffff81234567 RFL=2"})
    fake.answers["nmi"] = ""
    keep = tmp_path / "kept"
    original = postmortem.Monitor.command

    def command(self: postmortem.Monitor, line: str) -> str:
        result = original(self, line)
        if line == "nmi":
            nmi_panic()
        return result

    postmortem.Monitor.command = command  # type: ignore[method-assign]
    try:
        report = postmortem.collect("the lab stopped answering", postmortem.Monitor(tmp_path / "m.sock"),
                                    console, qemu_log, None, keep, nmi=True)  # fmt: skip
    finally:
        postmortem.Monitor.command = original  # type: ignore[method-assign]
    summary = report.summary()
    assert fake.commands == ["info registers -a", "sendkey alt-sysrq-l", "sendkey alt-sysrq-w", "nmi"]
    assert "RIP=ffffffff81234567" in summary
    assert "the agent inside the lab did not answer" in summary
    assert "kvm_vcpu_halt" in summary and "svm_vcpu_run" in summary
    assert str(keep) in summary
    assert (keep / "registers.txt").exists() and "NMI backtrace" in (keep / "lab-console.log").read_text()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/v/bin/python", "-m", "memvisor", "run", "--exec", "x"], True),
        (["/v/bin/memvisor", "run"], True),
        (["/v/bin/python", "-m", "memvisor", "lab", "--", "x"], False),
        (["/v/bin/python", "-m", "pytest", "tests/guest"], False),
        (["sh", "-c", "echo memvisor run"], False),
    ],
)
def test_which_processes_are_memvisor_runs(argv: list[str], expected: bool) -> None:
    assert diagnose.is_memvisor_run(argv) is expected


def test_console_of_a_memvisor_run() -> None:
    assert diagnose.console_of(["memvisor", "run", "--console", "/tmp/c.log"]) == "/tmp/c.log"
    assert diagnose.console_of(["memvisor", "run", "--console=/tmp/d.log"]) == "/tmp/d.log"
    assert diagnose.console_of(["memvisor", "run"]) is None


def test_the_lab_kernel_shows_its_boot_and_takes_an_nmi_as_a_backtrace(tmp_path: Path) -> None:
    machine = plan.LabMachine(kernel=Path("/k"), initrd=Path("/i"), memory=1 << 30, cpus=2, python="/usr/bin/python3",
                              root="/r", port_socket=tmp_path / "p.sock", console_log=tmp_path / "c.log",
                              monitor_socket=tmp_path / "m.sock")  # fmt: skip
    argv = plan.qemu_command(machine)
    append = argv[argv.index("-append") + 1].split()
    assert "quiet" not in append and "loglevel=0" not in append
    assert "unknown_nmi_panic=1" in append
    assert argv[argv.index("-monitor") + 1] == f"unix:{tmp_path / 'm.sock'},server=on,wait=off"


@pytest.mark.parametrize(
    ("command", "timeout", "expected"),
    [("uname -r", 20.0, 300 + 20 + 90), ("uname -r", None, None), (None, 20.0, None)],
)
def test_memvisor_run_through_the_lab_has_a_deadline_with_exec_and_timeout(
    command: str | None, timeout: float | None, expected: float | None
) -> None:
    import argparse

    from memvisor.cli.run import _lab_deadline

    assert _lab_deadline(argparse.Namespace(command=command, timeout=timeout)) == expected


def test_a_signal_while_the_lab_starts_ends_it_at_once(fake_qemu, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    said: list[str] = []
    host_end, lab_end = socket.socketpair()  # the lab never says READY
    session = LabSession(_request("true"), [], host_end, fake_qemu, tmp_path / "c.log", forward_stdin=False,
                         log=lambda m: None, warn=said.append)  # fmt: skip
    stop = _StopRequest()
    stop.handle(15, None)
    started = time.monotonic()
    assert session.run(stop) == 128 + 15
    assert time.monotonic() - started < 2
    assert said == ["SIGTERM while the lab was starting: stopping it"]
    lab_end.close()
    host_end.close()



# A lab kernel panic as Linux 6.1 prints it under `unknown_nmi_panic=1 panic_print=0x40` (the shape of the one
# a CI run ended with): the cause comes first, then pages of backtraces that hide it in the console's tail.
_NMI_PANIC_CONSOLE = """\
[ 1490.100000] virtio_balloon virtio0: something earlier
[ 1495.700001] Uhhuh. NMI received for unknown reason 3d on CPU 0.
[ 1495.700002] Kernel panic - not syncing: NMI: Not continuing
[ 1495.700003] CPU: 0 PID: 4242 Comm: vcpu0 Not tainted 6.1.0-28-amd64 #1  Debian 6.1.119-1
[ 1495.700004] Call Trace:
[ 1495.700005]  <NMI>
[ 1495.700006]  dump_stack_lvl+0x44/0x5c
[ 1495.700007]  panic+0x118/0x2ed
[ 1495.700008]  nmi_panic.cold+0xc/0xc
[ 1495.700009]  </NMI>
[ 1495.700010]  <TASK>
[ 1495.700011] RIP: 0010:svm_vcpu_run+0x3a2/0x6d0 [kvm_amd]
""" + "".join(f"[ 1495.752916] R{n}: 0000000000000000\n" for n in range(30)) + """\
[ 1495.752916]  </TASK>
[ 1495.752916] Sending NMI from CPU 0 to CPUs 1:
[ 1495.841001] NMI backtrace for cpu 1 skipped: idling at native_safe_halt+0xb/0x10
[ 1495.752916] Kernel Offset: disabled
"""


def test_a_lab_panic_is_told_from_its_cause_not_its_tail() -> None:
    story = postmortem.panic_story(_NMI_PANIC_CONSOLE)
    assert story[0].endswith("Uhhuh. NMI received for unknown reason 3d on CPU 0.")
    assert any("Kernel panic - not syncing: NMI: Not continuing" in line for line in story)
    assert any("svm_vcpu_run" in line for line in story)
    assert not any("something earlier" in line for line in story)
    assert postmortem.panic_story("[ 1.0] a quiet console\n[ 2.0] nothing went wrong\n") == []


def _frame(rip: str, stamp: str = "118.149400") -> str:
    return (f"[  {stamp}] RIP: 0010:{rip}\n[  {stamp}] RSP: 0018:ffffc9000053c000 EFLAGS: 00000083\n"
            f"[  {stamp}] RAX: 0000000000000000 RBX: ffffc9000053c028\n[  {stamp}]  asm_exc_page_fault+0x22/0x30\n")


# Shaped like the lab panic of 2026-12-01 (manager test): an IRQ taken right after VMRUN, with the guest's GS
# base still loaded, page-faults on `current` and faults again in the handler until the stack overflows.
_STACK_OVERFLOW_CONSOLE = (
    "[   65.900253] WARNING: something earlier, a minute before\n"
    "[  118.149400] BUG: TASK stack guard page was hit at 000000007660be72 (stack is 000000006ff3571f..)\n"
    "[  118.149400] stack guard page: 0000 [#1] PREEMPT SMP NOPTI\n"
    + "".join(_frame("exc_page_fault+0x1e/0x170") for _ in range(400))
    + _frame("irqentry_enter+0x12/0x50")
    + "[  118.149400]  sysvec_reschedule_ipi+0xa/0x110\n"
    + _frame("__svm_vcpu_run+0x9c/0x210 [kvm_amd]")
    + "[  118.149400]  svm_vcpu_enter_exit+0x4a/0x80 [kvm_amd]\n"
    + "[  118.311311] Kernel panic - not syncing: Fatal exception in interrupt\n"
    + "[  118.311311]  panic+0x154/0x2f4\n[  118.311311]  handle_stack_overflow+0x49/0x60\n"
)


def test_a_long_recursive_crash_is_told_from_its_cause_with_every_interrupted_context() -> None:
    story = postmortem.panic_story(_STACK_OVERFLOW_CONSOLE)
    assert "BUG: TASK stack guard page was hit" in story[0]
    assert len(story) <= postmortem.CRASH_LINES + 1 + 8
    contexts = next(line for line in story if "interrupted contexts" in line)
    assert contexts.index("exc_page_fault") < contexts.index("irqentry_enter") < contexts.index("__svm_vcpu_run")
    assert any("Kernel panic - not syncing: Fatal exception in interrupt" in line for line in story)
    assert not any("something earlier" in line for line in story)


def test_the_stopped_lab_message_names_the_panic_and_keeps_the_console(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text(_NMI_PANIC_CONSOLE)
    qemu_log = tmp_path / "qemu.log"
    qemu_log.write_text("")
    error = runner._stopped_error(0, qemu_log, console)
    message = str(error)
    assert isinstance(error, LabCrashed) and error.exit_status == EXIT_LAB_CRASHED
    assert "the lab's kernel panicked" in message and "NMI: Not continuing" in message
    kept = Path(message.rsplit("full console: ", 1)[1].strip())
    try:
        assert kept.read_text() == _NMI_PANIC_CONSOLE
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)
    console.write_text("[ 1.0] the lab powered off\n")
    error = runner._stopped_error(0, qemu_log, console)
    assert not isinstance(error, LabCrashed) and "panicked" not in str(error)
