"""The manager's TOML config and host readers: valid files parse, every mistake is one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvisor.errors import UsageError
from memvisor.manager import config
from memvisor.manager.cli import watch_table
from memvisor.manager.host import HostInputs, parse_flat_keyed, parse_meminfo, parse_psi
from memvisor.manager.loop import RoundRecord
from memvisor.manager.policy import Decision, VmAction
from memvisor.manager.vm import vm_name

MiB = 1 << 20


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("""
interval = 2
controller = "mom"
budget = "2G"
[policy]
step_percent = 4
min_headroom = "128M"
stuck_intervals = 5
[defaults]
floor = "300M"
[vm.web]
floor = "512M"
ceiling = "3G"
priority = 10
cgroup = "/sys/fs/cgroup/machine.slice/web"
""")
    cfg = config.load(path)
    assert cfg.interval == 2 and cfg.policy == "mom" and cfg.budget == 2 << 30
    assert cfg.knobs.step_percent == 4 and cfg.knobs.min_headroom == 128 * MiB and cfg.knobs.stuck_intervals == 5
    assert cfg.for_vm("web").floor == 512 * MiB and cfg.for_vm("web").priority == 10
    assert cfg.for_vm("other").floor == 300 * MiB
    assert cfg.for_vm("web").cgroup == "/sys/fs/cgroup/machine.slice/web"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interval = 0", "interval must be between"),
        ('controller = "magic"', "controller 'magic' is unknown"),
        ("bogus = 1", "unknown key 'bogus'"),
        ('[policy]\nstep_pct = 3', "unknown key 'step_pct'"),
        ('[policy]\nstep_percent = 300', "between 0 and 100"),
        ('[vm.a]\nfloor = "lots"', "is not a size"),
        ('[vm.a]\nfloor = "1G"\nceiling = "512M"', "ceiling is below floor"),
        ('[vm.a]\nfloor = "1M"', "too small"),
        ("interval = [", "not valid TOML"),
        ('[defaults]\npriority = "high"', "must be a number"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        config.load(path)
    assert "\n" not in str(info.value)


def test_missing_config_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no config file"):
        config.load(tmp_path / "absent.toml")


def test_host_parsers() -> None:
    assert parse_meminfo("MemTotal:  100 kB\nMemAvailable:   50 kB\nHugePages_Total: 0\n") == {
        "MemTotal": 102400, "MemAvailable": 51200, "HugePages_Total": 0}  # fmt: skip
    psi = parse_psi("some avg10=1.50 avg60=0.20 avg300=0.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert psi["some"]["avg10"] == 1.5 and psi["full"]["total"] == 0
    assert parse_flat_keyed("pswpin 3\npswpout 7\n")["pswpout"] == 7


def test_host_inputs_from_a_fake_proc(tmp_path: Path) -> None:
    (tmp_path / "pressure").mkdir()
    (tmp_path / "meminfo").write_text("MemAvailable: 2048 kB\n")
    (tmp_path / "pressure" / "memory").write_text("some avg10=12.00 avg60=0 avg300=0 total=9\n")
    (tmp_path / "vmstat").write_text("pswpout 10\n")
    host = HostInputs(tmp_path)
    assert host.mem_available() == 2 * MiB
    assert host.psi_some_avg10() == 12.0
    assert host.swap_out_bytes() == 10 * 4096
    assert HostInputs(tmp_path / "none").mem_available() is None


def test_vm_names_and_watch_table() -> None:
    assert vm_name("/run/vms/web.sock") == "web" and vm_name("/tmp/q.qmp") == "q"
    record = RoundRecord(0.0, 2 << 30, 900 * MiB, 4 << 30)
    record.vms["web"] = {"floor": 256 * MiB, "plan": 600 * MiB, "size": 700 * MiB, "guest-total": 660 * MiB,
                         "guest-available": 300 * MiB, "host": 500 * MiB, "reason": "reclaim"}  # fmt: skip
    text = watch_table(record, Decision([VmAction("web", 600 * MiB, 600 * MiB, None, "reclaim")], 2 << 30, True))
    assert "budget 2048M" in text and "web" in text and "360M" in text
