"""What the lab runner decides before QEMU starts: shares, forwarded sockets, memory, the command line."""

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from memvisor.errors import MemvisorError, UsageError
from memvisor.lab import plan


def test_a_share_resolves_to_its_real_folder(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert plan.resolve_share(tmp_path / "link") == os.path.realpath(tmp_path / "real")


@pytest.mark.parametrize("folder", ["/proc/self", "/sys/kernel", "/dev"])
def test_pseudo_filesystems_cannot_be_shared(folder: str) -> None:
    with pytest.raises(UsageError, match="/proc, /sys or /dev"):
        plan.resolve_share(Path(folder))


def test_missing_or_root_shares_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an existing folder"):
        plan.resolve_share(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not an existing folder"):
        plan.resolve_share(tmp_path / "file")
    with pytest.raises(UsageError, match="cannot share /"):
        plan.resolve_share(Path("/"))


def test_share_folder_of_a_file(tmp_path: Path) -> None:
    assert plan.share_folder_of(tmp_path / "console.log") == Path(os.path.realpath(tmp_path))


def test_forward_in_a_shared_folder_or_a_lab_tmpfs_is_accepted(tmp_path: Path) -> None:
    shared = os.path.realpath(tmp_path)
    assert plan.resolve_forward(tmp_path / "q.sock", [shared]) == os.path.join(shared, "q.sock")
    # /tmp is a tmpfs inside the lab: writable there even when not shared.
    assert plan.resolve_forward(Path("/tmp/q.sock"), []) == "/tmp/q.sock"


def test_forward_in_a_read_only_folder_names_the_fix() -> None:
    with pytest.raises(UsageError, match=r"read-only inside the lab; share it \(--share /usr\)"):
        plan.resolve_forward(Path("/usr/q.sock"), [])


def test_forward_needs_an_existing_folder_and_a_short_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        plan.resolve_forward(tmp_path / "absent" / "q.sock", [str(tmp_path)])
    with pytest.raises(UsageError, match="107 bytes"):
        plan.resolve_forward(tmp_path / ("x" * 120), [os.path.realpath(tmp_path)])


def test_forward_over_a_regular_file_is_refused_but_a_stale_socket_is_fine(tmp_path: Path) -> None:
    shared = [os.path.realpath(tmp_path)]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a socket"):
        plan.resolve_forward(tmp_path / "file", shared)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    assert plan.resolve_forward(tmp_path / "stale.sock", shared).endswith("stale.sock")


def test_lab_memory_for_a_guest() -> None:
    gib = 1 << 30
    assert plan.lab_memory_for(gib, available=16 * gib) == gib + plan.LAB_OVERHEAD
    # Capped at what the host can give while the lab keeps its minimum...
    capped = plan.lab_memory_for(gib, available=4 * gib)
    assert capped == 2 * gib - plan.CAP_MARGIN
    plan.check_lab_memory(capped, 4 * gib - plan.CAP_MARGIN // 2)  # still fine when MemAvailable dips
    # ...and refused below that.
    with pytest.raises(
        MemvisorError, match="a guest of 2G needs a lab of at least 2560M but the host has 4G"
    ):
        plan.lab_memory_for(2 * gib, available=4 * gib)


def test_memory_sizing() -> None:
    plan.check_lab_memory(4 << 30, 8 << 30)
    with pytest.raises(MemvisorError, match="the lab needs 7G but the host has 8G available"):
        plan.check_lab_memory(7 << 30, 8 << 30)
    with pytest.raises(UsageError, match="too small"):
        plan.check_lab_memory(64 << 20, 8 << 30)


def test_mem_available_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:    2048 kB\n")
    assert plan.mem_available(meminfo) == 2 << 20
    meminfo.write_text("MemTotal:  100 kB\n")
    with pytest.raises(MemvisorError, match="MemAvailable"):
        plan.mem_available(meminfo)


def _machine(**changes: object) -> plan.LabMachine:
    fields: dict[str, object] = {
        "kernel": Path("/k/vmlinuz"),
        "initrd": Path("/k/initrd"),
        "memory": 3 << 30,
        "cpus": 2,
        "python": "/venv/bin/python",
        "root": "/work/main",
        "port_socket": Path("/tmp/lab,1/lab.sock"),
        "console_log": Path("/tmp/lab/console.log"),
        "shares": ("/data/a,b", "/tmp/x"),
    }
    fields.update(changes)
    return plan.LabMachine(**fields)  # type: ignore[arg-type]


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_qemu_command_line() -> None:
    argv = plan.qemu_command(_machine())
    assert argv[0] == "qemu-system-x86_64"
    assert _option(argv, "-accel") == ["tcg,thread=multi"]
    assert _option(argv, "-cpu") == ["max"]  # SVM for nested KVM
    assert _option(argv, "-smp") == ["2"]
    assert _option(argv, "-m") == ["3072M"]
    assert "-no-reboot" in argv
    assert _option(argv, "-serial") == ["file:/tmp/lab/console.log"]
    append = _option(argv, "-append")[0].split()
    assert {"console=ttyS0", "panic=-1", "mvlab.python=/venv/bin/python", "mvlab.root=/work/main"} <= set(
        append
    )
    virtfs = _option(argv, "-virtfs")
    assert virtfs[0] == "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    # Commas in paths are doubled, as QEMU's option parser expects; shares are read-write.
    assert virtfs[1] == "local,path=/data/a,,b,mount_tag=rw0,security_model=mapped-xattr,multidevs=remap"
    assert virtfs[2].startswith("local,path=/tmp/x,mount_tag=rw1,")
    chardev = _option(argv, "-chardev")[0]
    assert chardev == "socket,id=mvlab,path=/tmp/lab,,1/lab.sock,server=on,wait=on"
    assert "virtserialport,chardev=mvlab,name=memvisor.lab" in _option(argv, "-device")


def test_paths_with_spaces_cannot_go_on_the_kernel_command_line() -> None:
    with pytest.raises(UsageError, match="without spaces"):
        plan.qemu_command(_machine(python="/my venv/bin/python"))
    with pytest.raises(UsageError, match="at least one vCPU"):
        plan.qemu_command(_machine(cpus=0))


def test_working_folder_hidden_by_a_lab_tmpfs_must_be_shared() -> None:
    plan.check_cwd("/usr", [])
    plan.check_cwd("/tmp/work", ["/tmp/work"])
    with pytest.raises(UsageError, match=r"under /tmp, which is an empty tmpfs inside the lab: share it"):
        plan.check_cwd("/tmp/work", [])


def test_the_labs_qemu_is_the_one_on_path_unless_the_environment_names_another(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(plan.QEMU_ENV, raising=False)
    assert plan.lab_qemu() == "qemu-system-x86_64"
    monkeypatch.setenv(plan.QEMU_ENV, "/opt/qemu-10/bin/qemu-system-x86_64")
    assert plan.lab_qemu() == "/opt/qemu-10/bin/qemu-system-x86_64"
    machine = dataclasses.replace(_machine(), qemu=plan.lab_qemu())
    assert plan.qemu_command(machine)[0] == "/opt/qemu-10/bin/qemu-system-x86_64"


def test_extra_kvm_amd_parameters_reach_the_lab_kernel_as_one_word(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(plan.KVM_AMD_ENV, raising=False)
    assert plan.lab_kvm_amd() == ("npt=0",)  # shadow paging by default (docs/LAB.md)
    machine = dataclasses.replace(_machine(), kvm_amd=plan.lab_kvm_amd())
    assert "mvlab.kvm_amd=npt=0" in _option(plan.qemu_command(machine), "-append")[0].split()
    monkeypatch.setenv(plan.KVM_AMD_ENV, " ")  # empty: kvm_amd's own defaults, no word at all
    assert plan.lab_kvm_amd() == ()
    machine = dataclasses.replace(_machine(), kvm_amd=plan.lab_kvm_amd())
    assert not [w for w in _option(plan.qemu_command(machine), "-append")[0].split() if "kvm_amd" in w]
    monkeypatch.setenv(plan.KVM_AMD_ENV, "npt=0, avic=0")
    assert plan.lab_kvm_amd() == ("npt=0", "avic=0")
    machine = dataclasses.replace(_machine(), kvm_amd=plan.lab_kvm_amd())
    assert "mvlab.kvm_amd=npt=0,avic=0" in _option(plan.qemu_command(machine), "-append")[0].split()


@pytest.mark.parametrize("value", ["npt", "npt=0 avic=0", "npt=0;reboot", "NPT=0", "npt=$(x)"])
def test_a_kvm_amd_value_that_is_not_name_equals_value_is_refused(monkeypatch, value: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(plan.KVM_AMD_ENV, value)
    with pytest.raises(UsageError, match=r"MEMVISOR_LAB_KVM_AMD holds .* write NAME=VALUE pairs"):
        plan.lab_kvm_amd()
