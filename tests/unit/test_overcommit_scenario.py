"""Issue 10's scenario benchmark (benchmarks/overcommit_scenario.py): its pure parts in benchmarks/overcommit_parts.py,
the modes, the phases, the guest workload scripts (run here with the host's sh), the counters, the time over budget
and the table."""

import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.overcommit_parts import (
    DEFAULT_MODES,
    FULL,
    MODES,
    QUICK,
    SEED,
    ModeResult,
    Sample,
    WorkloadResult,
    at_limit_seconds,
    average_held,
    background,
    count_oom_kills,
    counter_delta,
    hold_script,
    over_budget_seconds,
    parse_modes,
    parse_status,
    phase_schedule,
    read_script,
    render_table,
    schedule_seconds,
    workload_columns,
)
from memvisor.manager.host import parse_flat_keyed

MiB = 1 << 20


# --- modes --------------------------------------------------------------------------------------------------------


def test_the_default_modes_are_the_four_runs_of_the_issue() -> None:
    assert [(m.name, m.reporting, m.policy, m.limited) for m in parse_modes(DEFAULT_MODES)] == [
        ("none", False, None, True), ("reporting", True, None, True), ("mom", True, "mom", True),
        ("memvisor", True, "memvisor", True)]  # fmt: skip
    baseline = MODES["unconstrained"]  # the slowdown goal's baseline: named on purpose, not by default
    assert (baseline.reporting, baseline.policy, baseline.limited) == (True, None, False)


def test_parse_modes_keeps_the_order_given() -> None:
    assert [m.name for m in parse_modes("memvisor, reporting")] == ["memvisor", "reporting"]


@pytest.mark.parametrize(("text", "message"), [("", "empty"), ("reporting,qemu", "unknown mode 'qemu'"),
                                               ("mom,mom", "twice")])  # fmt: skip
def test_parse_modes_rejects_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_modes(text)


# --- the schedule ---------------------------------------------------------------------------------------------------


def test_the_schedule_follows_the_issue() -> None:
    phases = phase_schedule(FULL)
    assert [p.name for p in phases] == ["a holds", "b holds", "c reads", "a+b hold"]
    assert [[(w.guest, w.kind, w.size >> 20) for w in p.workloads] for p in phases] == [
        [("a", "hold", 700)], [("b", "hold", 700)], [("c", "read", 600)], [("a", "hold", 700), ("b", "hold", 700)]]  # fmt: skip
    assert FULL.budget == 2 << 30 and FULL.guest_memory == 1 << 30 and FULL.hold_seconds == 60


def test_quick_is_shorter_and_smaller_and_still_overcommitted() -> None:
    assert schedule_seconds(QUICK) < schedule_seconds(FULL) / 2
    assert QUICK.hold < FULL.hold and QUICK.read < FULL.read
    assert 3 * QUICK.guest_memory > QUICK.budget  # overcommitted: the guests could take more than the budget
    for scenario in (FULL, QUICK):
        assert scenario.hold % SEED == 0 and scenario.read % SEED == 0


def test_schedule_seconds_counts_settle_holds_and_gaps_once_per_phase() -> None:
    # settle 30 + three phases with a hold (the pair holds side by side: once) x 60 + four gaps x 30
    assert schedule_seconds(FULL) == 30 + 3 * 60 + 4 * 30


def test_workload_columns_name_both_workloads_of_the_pair() -> None:
    assert workload_columns(phase_schedule(QUICK)) == ["a holds", "b holds", "c reads", "a+b hold: a", "a+b hold: b"]


# --- the guest scripts, run here with sh ------------------------------------------------------------------------------


def run_sh(script: str) -> None:
    subprocess.run(["sh", "-c", script], check=True, timeout=60)


def test_hold_script_fills_keeps_frees_and_reports(tmp_path: Path) -> None:
    status = tmp_path / "status"
    script = hold_script(2 * SEED, 0.2, str(status), directory=str(tmp_path))
    seen: list[int] = []
    proc = subprocess.Popen(["sh", "-c", script])
    while proc.poll() is None:
        data = tmp_path / "data"
        if data.exists():
            seen.append(data.stat().st_size)
        time.sleep(0.02)
    assert proc.returncode == 0
    assert max(seen) + SEED == 2 * SEED  # the seed plus one more copy of it: the size asked for
    assert not (tmp_path / "data").exists() and not (tmp_path / "seed").exists()
    result = parse_status(status.read_text())
    assert result is not None and result.status == 0
    assert result.total_seconds >= 0.2 and result.work_seconds <= result.total_seconds


def test_hold_script_reports_a_failed_fill_and_does_not_hold(tmp_path: Path) -> None:
    status = tmp_path / "status"
    run_sh(hold_script(SEED, 30, str(status), directory=str(tmp_path / "missing")))  # would hold 30 s if it filled
    result = parse_status(status.read_text())
    assert result is not None and result.status == 1 and result.total_seconds < 5


def test_hold_script_rejects_sizes_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="multiple of 4M"):
        hold_script(SEED + 1, 1, "/tmp/s")


def test_read_script_reads_the_device_and_reports(tmp_path: Path) -> None:
    device, status = tmp_path / "dev", tmp_path / "status"
    device.write_bytes(b"x" * 4096)
    run_sh(read_script(str(status), device=str(device)))
    result = parse_status(status.read_text())
    assert result is not None and result.status == 0 and result.work_seconds == result.total_seconds
    run_sh(read_script(str(status), device=str(tmp_path / "absent")))
    failed = parse_status(status.read_text())
    assert failed is not None and failed.status != 0


def test_background_survives_the_quotes_in_the_script(tmp_path: Path) -> None:
    status = tmp_path / "status"
    run_sh(background(f"echo 'it''s' \"$(echo ok)\" > {status}"))
    deadline = time.monotonic() + 10
    while not status.exists() or not status.read_text():
        assert time.monotonic() < deadline, "the detached script never wrote its file"
        time.sleep(0.05)
    assert status.read_text() == "its ok\n"


@pytest.mark.parametrize("text", ["", "0 1.0 2.0", "0 1.0 2.0 x", "x 1 2 3", "0 5.0 2.0 6.0", "0 1 2 3 4"])
def test_parse_status_refuses_a_partial_or_odd_line(text: str) -> None:
    assert parse_status(text) is None


def test_parse_status_reads_guest_uptimes() -> None:
    assert parse_status("0 100.50 112.75 172.80\n") == WorkloadResult(0, 12.25, 72.3)


# --- host counters --------------------------------------------------------------------------------------------------


def test_counters_from_vmstat_and_memory_events() -> None:
    before = parse_flat_keyed("nr_free_pages 1000\npswpin 10\npswpout 200\n")
    after = parse_flat_keyed("nr_free_pages 900\npswpin 12\npswpout 950\nbogus line here\n")
    assert counter_delta(before, after, "pswpout") == 750
    events = parse_flat_keyed("low 0\nhigh 0\nmax 17\noom 0\noom_kill 1\noom_group_kill 0\n")
    assert counter_delta({}, events, "max") == 17 and counter_delta({}, events, "oom_kill") == 1
    assert counter_delta({"max": 5}, {}, "max") == 0  # a counter read as missing never counts negative


def test_count_oom_kills_counts_each_kill_once() -> None:
    dmesg = """[  10.1] sh invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0
[  10.2] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),task=cat,pid=120,uid=0
[  10.2] Out of memory: Killed process 120 (cat) total-vm:2000kB, anon-rss:100kB
[  10.3] oom_reaper: reaped process 120 (cat), now anon-rss:0kB
[  20.0] Out of memory: Killed process 130 (sh) total-vm:2000kB
"""
    assert count_oom_kills(dmesg) == 2
    assert count_oom_kills("[ 1.0] virtio_balloon virtio2: free page reporting enabled\n") == 0


# --- samples ----------------------------------------------------------------------------------------------------------


def samples(*values: tuple[float, int, int]) -> list[Sample]:
    return [Sample(t, current * MiB, swap * MiB) for t, current, swap in values]


def test_over_budget_counts_ram_plus_swap_until_the_next_sample() -> None:
    run = samples((0, 900, 0), (1, 1000, 100), (3, 1000, 0), (4, 1200, 0), (4.5, 100, 0))
    assert over_budget_seconds(run, 1000 * MiB) == 2.5  # [1, 3) with swap, [4, 4.5) in RAM
    assert over_budget_seconds(run[:1], 1000 * MiB) == 0.0
    assert over_budget_seconds([], 1000 * MiB) == 0.0


def test_at_limit_is_memory_current_near_memory_max() -> None:
    run = samples((0, 990, 500), (2, 900, 0), (3, 1000, 0), (4, 0, 0))
    assert at_limit_seconds(run, 1000 * MiB) == 3.0  # [0, 2) within 16M, [3, 4) at it


def test_average_held_weighs_by_time() -> None:
    assert average_held(samples((0, 100, 0), (3, 400, 0), (4, 0, 0))) == 175 * MiB  # (100*3 + 400*1) / 4
    assert average_held(samples((5, 300, 0))) == 300 * MiB
    assert average_held([]) == 0


# --- the table ------------------------------------------------------------------------------------------------------


def test_render_table_a_row_per_mode() -> None:
    phases = phase_schedule(FULL)
    done = WorkloadResult(0, 12.345, 75)
    good = ModeResult(MODES["memvisor"], pswpout=12, over_budget=0.0, at_limit=1.5, max_events=3, guest_oom_kills=0, cgroup_oom_kills=1,
                      workloads={"a holds": done, "b holds": WorkloadResult(137, 1, 2), "c reads": None},
                      average_held=1500 * MiB, peak_held=1900 * MiB)  # fmt: skip
    failed = ModeResult(MODES["none"], error="guest b did not boot | odd")
    table = render_table([good, failed], phases, FULL)
    lines = table.splitlines()
    header = lines[2]
    assert header.startswith("| mode | host pswpout (pages) | over budget (s) |")
    assert "| a+b hold: a (s) | a+b hold: b (s) |" in header
    assert lines[3].count("---") == header.count("|") - 1
    row = lines[4]
    assert row == ("| memvisor's manager | 12 | 0.0 | 1.5 | 3 | 0 | 1 | 12.3 | failed (137) | - | - | - | 1500 | 1900 |")
    assert lines[5].startswith("| no manager, no reporting | failed: guest b did not boot / odd |")
    assert lines[5].count("|") == header.count("|")
    assert "budget 2048M" in lines[0]


def test_render_table_unknown_oom_count() -> None:
    table = render_table([ModeResult(MODES["reporting"])], phase_schedule(QUICK), QUICK)
    assert "| free page reporting only | 0 | 0.0 | 0.0 | 0 | ? | 0 |" in table


def test_the_plot_has_a_panel_per_mode(tmp_path: Path) -> None:
    from benchmarks import overcommit_scenario as scenario

    run = samples((100, 900, 0), (101, 1300, 200), (102, 1000, 50))
    traces = [scenario.Trace(MODES["none"], run, [(100.5, "a holds")]), scenario.Trace(MODES["memvisor"], [], [])]
    path = tmp_path / "run.png"
    scenario.plot(traces, 1280 * MiB, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
