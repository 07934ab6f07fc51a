"""`memvisor lab` argument handling and the runner's checks that come before QEMU starts."""

from pathlib import Path

import pytest

from memvisor.errors import MemvisorError, UsageError
from memvisor.lab import runner
from memvisor.lab.cli import build_parser, lab_main


def test_command_after_double_dash_is_kept_whole() -> None:
    args = build_parser().parse_args(
        ["--memory", "3G", "--share", "/a", "--share", "/b", "--", "pytest", "-k", "x"]
    )
    assert args.command == ["--", "pytest", "-k", "x"]
    assert args.share == ["/a", "/b"] and args.memory == "3G"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a command"),
        (["--"], "give a command"),
        (["--cpus", "0", "--", "true"], "--cpus 0 is out of range"),
        (["--memory", "1Q", "--", "true"], "'1Q' is not a size"),
        (["--bogus", "--", "true"], "unrecognized arguments"),
        (["--timeout", "0", "--", "true"], "--timeout 0 must be a positive number"),
        (["--timeout", "soon", "--", "true"], "invalid float value"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        lab_main(argv)


def _no_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("QEMU must not start when the checks fail")

    monkeypatch.setattr(runner.subprocess, "Popen", refuse)


def test_a_lab_larger_than_the_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_qemu(monkeypatch)
    monkeypatch.setattr(runner.plan, "mem_available", lambda: 4 << 30)
    with pytest.raises(MemvisorError, match="the lab needs 3G but the host has 4G available"):
        runner.run_in_lab(["true"], memory=3 << 30, cwd="/", env={})


def test_unshareable_paths_are_refused_before_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_qemu(monkeypatch)
    with pytest.raises(UsageError, match="cannot share"):
        runner.run_in_lab(["true"], memory=1 << 30, cwd="/", env={}, shares=[tmp_path / "absent"])
    with pytest.raises(UsageError, match="read-only inside the lab"):
        runner.run_in_lab(["true"], memory=1 << 30, cwd="/", env={}, forwards=[Path("/usr/x.sock")])
    with pytest.raises(UsageError, match="empty tmpfs inside the lab"):
        runner.run_in_lab(["true"], memory=1 << 30, cwd=str(tmp_path), env={})
    with pytest.raises(MemvisorError, match="nothing to run"):
        runner.run_in_lab([], memory=1 << 30, cwd="/", env={})


def test_missing_qemu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    monkeypatch.setenv("MEMVISOR_LAB_KERNEL", str(kernel))
    monkeypatch.setenv("MEMVISOR_LAB_INITRD", str(kernel))
    monkeypatch.setattr(runner.plan, "mem_available", lambda: 64 << 30)
    monkeypatch.setattr(runner.plan.LabMachine, "__init__", _with_qemu("/nonexistent/qemu"), raising=True)
    with pytest.raises(MemvisorError, match="qemu-system-x86_64 is not installed"):
        runner.run_in_lab(["true"], memory=1 << 30, cwd="/", env={})


def _with_qemu(path: str):  # type: ignore[no-untyped-def]
    original = runner.plan.LabMachine.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **{**kwargs, "qemu": path})

    return init


def test_console_tail_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(b"line %d\r\n" % n for n in range(30)))
    assert runner.console_tail(log, lines=3) == "line 27 | line 28 | line 29"
    assert runner.console_tail(tmp_path / "absent") == "(no console log)"
    log.write_bytes(b"")
    assert runner.console_tail(log) == "(the console log is empty)"


def test_the_agent_imports_from_this_checkout() -> None:
    assert (Path(runner.package_root()) / "memvisor" / "lab" / "inner.py").is_file()


def test_labs_do_not_nest(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_qemu(monkeypatch)
    monkeypatch.setenv("MEMVISOR_IN_LAB", "1")
    with pytest.raises(MemvisorError, match="already inside memvisor's lab"):
        runner.run_in_lab(["true"], memory=1 << 30, cwd="/", env={})
