"""`memvisor run` with bad input: status 125 and one line on stderr that starts "memvisor: error:", no traceback.

Most cases run `python -m memvisor` as a subprocess, as a user would; `--lab off` keeps every case on this
host, and a synthetic kernel stands in for the Debian one where the check needs files that exist (so no
image is ever built). Only the corrupt-kernel case reaches KVM: skipped when /dev/kvm cannot be opened.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memvisor.cli.main import main
from memvisor.errors import EXIT_MEMVISOR_FAILURE
from tests.unit.test_boot_bzimage import make_bzimage

REPO = Path(__file__).resolve().parents[2]


def memvisor(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memvisor", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == EXIT_MEMVISOR_FAILURE, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memvisor: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A kernel and initramfs that exist (enough for every check before boot)."""
    folder = tmp_path_factory.mktemp("kernel")
    (folder / "vmlinuz").write_bytes(make_bzimage())
    (folder / "initrd.img").write_bytes(b"070701" + bytes(100))
    return str(folder / "vmlinuz"), str(folder / "initrd.img")


def run_args(files: tuple[str, str], *extra: str) -> list[str]:
    return ["run", "--lab", "off", "--kernel", files[0], "--initrd", files[1], *extra]


def test_memory_not_a_size(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--memory", "1Q")), "'1Q' is not a size", "512M")


def test_memory_too_small(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--memory", "64M")), "64M is too small", "at least 128M")


def test_memory_more_than_the_host_has(files: tuple[str, str]) -> None:
    assert_one_line_error(
        memvisor(*run_args(files, "--memory", "100T")), "100T", "more than the host can give"
    )


def test_memory_not_a_multiple_of_2m(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--memory", "200000001")), "multiple of 2M")


@pytest.mark.parametrize("vcpus", ["0", "99", "-1"])
def test_vcpus_out_of_range(files: tuple[str, str], vcpus: str) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--vcpus", vcpus)), f"--vcpus {vcpus}", "1 to 8")


def test_unknown_device(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--device", "foo")), "'foo'", "virtio-balloon")


def test_virtio_mem_without_max_size(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--device", "virtio-mem")), "max-size")


def test_balloon_with_a_bogus_property(files: tuple[str, str]) -> None:
    assert_one_line_error(
        memvisor(*run_args(files, "--device", "virtio-balloon,bogus=1")), "'bogus'", "free-page-reporting"
    )


def test_missing_kernel_and_initrd() -> None:
    result = memvisor("run", "--lab", "off", "--kernel", "/nonexistent", "--initrd", "/nonexistent")
    assert_one_line_error(result, "/nonexistent", "does not exist")


def test_missing_initrd(files: tuple[str, str]) -> None:
    result = memvisor("run", "--lab", "off", "--kernel", files[0], "--initrd", "/nonexistent/initrd")
    assert_one_line_error(result, "initramfs /nonexistent/initrd does not exist")


def test_initrd_without_kernel(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor("run", "--lab", "off", "--initrd", files[1]), "--initrd needs --kernel")


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


@pytest.mark.may_skip  # CI machines may have no /dev/kvm at all; the guest tests cover KVM in the lab
@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm cannot be opened here")
def test_corrupt_kernel(tmp_path: Path, files: tuple[str, str]) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(256 * 1024))
    result = memvisor(
        "run", "--lab", "off", "--memory", "128M", "--kernel", str(kernel), "--initrd", files[1]
    )
    assert_one_line_error(result, str(kernel), "not a Linux bzImage")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "--lab", "off", "--vcpus", "abc"], "invalid int value: 'abc'"),
        (["run", "--lab", "maybe"], "invalid choice: 'maybe'"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "COMMAND"),
    ],
)
def test_argument_errors_are_one_line(argv: list[str], words: str) -> None:
    line = assert_one_line_error(memvisor(*argv), words)
    assert "--help" in line


def test_help() -> None:
    result = memvisor("--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert "memvisor run --memory 1G --vcpus 2 --exec 'nproc'" in result.stdout
    for verb in ("run", "image", "lab"):
        assert verb in result.stdout


def test_run_help() -> None:
    result = memvisor("run", "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert "--exec 'nproc'" in result.stdout
    for option in ("--memory", "--vcpus", "--kernel", "--initrd", "--exec", "--device", "--lab", "125"):
        assert option in result.stdout


def test_in_process_main_prints_one_line(capsys: pytest.CaptureFixture[str], files: tuple[str, str]) -> None:
    assert main(run_args(files, "--memory", "1Q")) == EXIT_MEMVISOR_FAILURE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("memvisor: error: --memory '1Q' is not a size")
    assert captured.err.count("\n") == 1
    assert main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_memory_backend_not_a_kind(files: tuple[str, str]) -> None:
    assert_one_line_error(memvisor(*run_args(files, "--memory-backend", "huge")), "--memory-backend 'huge'",
                          "4k, thp, hugetlb")


def test_the_lab_hop_passes_the_discard_log_and_shares_its_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import argparse
    import types

    from memvisor.cli import run as run_module
    from memvisor.lab import runner

    seen: dict[str, Any] = {}

    def fake_run_in_lab(command: list[str], **options: Any) -> int:
        seen.update(options, command=command)
        return 0

    monkeypatch.setattr(runner, "run_in_lab", fake_run_in_lab)
    monkeypatch.setenv("MEMVISOR_DISCARD_LOG", str(tmp_path / "discards.log"))
    monkeypatch.setenv("MEMVISOR_NOT_FOR_THE_LAB", "1")
    args = argparse.Namespace(device=[], incoming=None, qmp=None, command=None, timeout=None)
    config = types.SimpleNamespace(kernel=Path("/k"), initrd=Path("/i"), memory=1 << 30, console_path=None)
    assert run_module._run_through_lab(args, [], config) == 0  # type: ignore[arg-type]
    assert seen["env"]["MEMVISOR_DISCARD_LOG"] == str(tmp_path / "discards.log")
    assert "MEMVISOR_NOT_FOR_THE_LAB" not in seen["env"]
    assert tmp_path.resolve() in seen["shares"]
