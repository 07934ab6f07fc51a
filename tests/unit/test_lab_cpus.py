"""The lab boots on one CPU and the agent brings the others online (memvisor/lab/cpus.py, plan.py)."""

from pathlib import Path

import pytest

from memvisor.lab import plan
from memvisor.lab.cpus import _cpu_list, bring_cpus_online


def fake_sysfs(root: Path, present: str, online: dict[int, str]) -> Path:
    (root / "present").write_text(present + "\n")
    for cpu, state in online.items():
        (root / f"cpu{cpu}").mkdir()
        if state:  # the boot CPU has no `online` file
            (root / f"cpu{cpu}" / "online").write_text(state + "\n")
    return root


def test_offline_cpus_are_brought_online_and_online_ones_left_alone(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, "0-3", {0: "", 1: "0", 2: "1", 3: "0"})
    assert bring_cpus_online(str(sysfs)) == [1, 3]
    assert [(sysfs / f"cpu{cpu}" / "online").read_text().strip() for cpu in (1, 2, 3)] == ["1", "1", "1"]
    assert bring_cpus_online(str(sysfs)) == []  # a second call changes nothing


def test_one_cpu_lab_brings_nothing_online(tmp_path: Path) -> None:
    assert bring_cpus_online(str(fake_sysfs(tmp_path, "0", {0: ""}))) == []


@pytest.mark.parametrize(("text", "cpus"), [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-1,4,6-7", [0, 1, 4, 6, 7])])
def test_the_kernels_cpu_list_format(text: str, cpus: list[int]) -> None:
    assert _cpu_list(text) == cpus


@pytest.mark.parametrize(("cpus", "word"), [(1, False), (2, True), (4, True)])
def test_a_lab_with_several_cpus_boots_on_one(tmp_path: Path, cpus: int, word: bool) -> None:
    machine = plan.LabMachine(kernel=Path("/k"), initrd=Path("/i"), memory=1 << 30, cpus=cpus, python="/usr/bin/python3",
                              root="/r", port_socket=tmp_path / "p.sock", console_log=tmp_path / "c.log")  # fmt: skip
    argv = plan.qemu_command(machine)
    assert ("maxcpus=1" in argv[argv.index("-append") + 1].split()) is word
    assert argv[argv.index("-smp") + 1] == str(cpus)  # QEMU still gives the lab all of them
