"""Issue 10: the overcommit manager holds two memvisor guests inside a host memory budget, with no guest OOM.

In CI since 2026-12-02. Its history: in its lab run of 2026-11-30 guest b triple-faulted (KVM_EXIT_SHUTDOWN) while
its balloon was being inflated, memvisor restarted it, and the restarted guest's stats polling was off (the manager
now turns it back on). That reset was issue 13's, of the lab's emulated nested paging; on shadow paging (the lab's
default since 2026-12-02) the test passed in its first run (inside the budget after 53 s, 257M + 257M after 140 s,
guest a's 256M written in 112 s, no OOM kill). By hand:
    .venv/bin/python scripts/guest-tests -k manager

Two 1G guests (virtio-balloon with free page reporting, no deflate-on-oom: giving memory back is the manager's
job here) run side by side under `memvisor manager --budget 1400M --interval 2`, started as a user would:
1. the manager brings the idle guests inside the budget (the budget's share at once, then step by step toward
   what each guest uses plus headroom, from its balloon statistics) until it has nothing left to take (both
   at their demand), and neither guest logs an OOM kill;
2. guest a's workload then grows (it fills a tmpfs, 8M a second): the manager gives memory back as it grows,
   the workload finishes, and again neither guest logs an OOM kill;
3. every round's plan stays inside the budget, and every decision has a reason.

On failure the report carries the manager's log (a line per change of target or reason, tmp_path/manager.stderr),
both consoles, and the last rounds of its decision log. The numbers are printed (pytest -s) for the record.
"""

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.guest.manager_run import read_decisions, running_manager
from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20
BUDGET = 1400 * MiB
DEVICE = "virtio-balloon,id=balloon0,free-page-reporting=on"
TMPFS = "/mnt/manager-test"
WORK_MIB = 256
CHUNK_MIB = 8
OOM_PATTERN = "out of memory|oom-kill|killed process"

pytestmark = pytest.mark.guest


def decisions(tmp_path: Path) -> list[dict[str, Any]]:
    return read_decisions(tmp_path / "decisions.jsonl")


def last_rounds(tmp_path: Path, count: int = 8) -> str:
    """The end of the decision log, one line per VM and round: what a failing wait needs to show."""
    lines = []
    for record in decisions(tmp_path)[-count:]:
        lines.append(f"{time.strftime('%H:%M:%S', time.gmtime(record['time']))} round took {record['took']} s")
        for name, vm in record["vms"].items():
            avail = vm["guest-available"]
            lines.append(f"  {name}: actual {vm['actual'] >> 20}M target {vm['target'] >> 20}M guest-available "
                         f"{'-' if avail is None else avail >> 20}M stuck {vm['stuck']} read in "
                         f"{vm['sample-seconds']} s: {vm['reason']}")  # fmt: skip
        lines += [f"  event {e['kind']} {e['vm'] or ''}: {e['message']}" for e in record["events"]]
    return "\n".join(lines) or "(no round logged: did the manager start? see manager.stderr)"


def wait_or_explain(tmp_path: Path, proc: subprocess.Popen[bytes], predicate: Callable[[], Any], timeout: float,
                    what: str) -> Any:  # fmt: skip
    def check() -> Any:
        if proc.poll() is not None:
            raise AssertionError(f"the manager exited ({proc.returncode}) while waiting for {what}")
        return predicate()

    try:
        return wait_until(check, timeout=timeout, interval=2, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}\nthe manager's last rounds:\n{last_rounds(tmp_path)}") from None


def actual(vm: GuestVM) -> int:
    return int(vm.cmd("query-balloon")["actual"])


def oom_lines(vm: GuestVM) -> str:
    return vm.exec(f"dmesg | grep -iE '{OOM_PATTERN}' || true").stdout.strip()


@pytest.mark.timeout(840)  # about 4 min in the lab; the waits are generous (slow labs), this bounds them all
def test_manager_holds_two_guests_in_a_budget_and_gives_memory_back_without_oom(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    start = time.monotonic()
    with GuestVM(tmp_path / "a", memory="1G", devices=[DEVICE]) as a, \
         GuestVM(tmp_path / "b", memory="1G", devices=[DEVICE]) as b:  # fmt: skip
        print(f"\n[manager] two guests booted in {time.monotonic() - start:.0f} s")
        a.check(f"mkdir -p {TMPFS} && mount -t tmpfs -o size=100% tmpfs {TMPFS}")
        host_before = a.host_memory() + b.host_memory()
        with running_manager([a.socket, b.socket], BUDGET, tmp_path / "decisions.jsonl",
                            tmp_path / "manager.stderr") as proc:  # fmt: skip
            # 1. reclaim: inside the budget, then both down toward what they use (statistics-driven)
            start = time.monotonic()
            wait_or_explain(tmp_path, proc, lambda: actual(a) + actual(b) <= BUDGET, 180,
                            "the two idle guests to be inside the budget")  # fmt: skip
            inside = time.monotonic() - start
            wait_or_explain(tmp_path, proc, lambda: max(actual(a), actual(b)) < 600 * MiB, 180,
                            "both idle guests to come down toward their demand (below 600M)")  # fmt: skip
            reclaimed = time.monotonic() - start

            def reclaim_done() -> bool:  # from its statistics the manager sees nothing left to take in either
                records = decisions(tmp_path)
                return bool(records) and len(records[-1]["vms"]) == 2 and all(
                    not vm["reason"].startswith(("reclaim", "no guest statistics")) and "cut to" not in vm["reason"]
                    for vm in records[-1]["vms"].values())  # fmt: skip

            wait_or_explain(tmp_path, proc, reclaim_done, 120, "reclaim to end (both guests at their demand)")
            time.sleep(4)  # free page reporting returns the last freed pages
            low_a, low_b = actual(a), actual(b)
            host_reclaimed = a.host_memory() + b.host_memory()
            print(f"[manager] inside the budget after {inside:.0f} s, below 600M after {reclaimed:.0f} s, reclaim done "
                  f"after {time.monotonic() - start - 4:.0f} s: guests "
                  f"{low_a >> 20}M + {low_b >> 20}M; host held {host_before >> 20}M before, "
                  f"{host_reclaimed >> 20}M after (budget {BUDGET >> 20}M)")  # fmt: skip
            assert (oom_lines(a), oom_lines(b)) == ("", ""), "a guest logged an OOM kill while reclaimed"
            assert host_reclaimed <= BUDGET

            # 2. guest a's workload grows: the manager must give memory back in time
            script = (f"i=0; while [ $i -lt {WORK_MIB // CHUNK_MIB} ]; do dd if=/dev/zero of={TMPFS}/f$i bs=1M "
                      f"count={CHUNK_MIB} 2>/dev/null || exit 1; i=$((i + 1)); sleep 1; done")  # fmt: skip
            a.check(f"(sh -c '{script}'; echo $? > /tmp/work.status) > /dev/null 2>&1 &")
            start = time.monotonic()
            status = wait_or_explain(tmp_path, proc, lambda: a.exec("cat /tmp/work.status 2>/dev/null").stdout.strip(),
                                     240, "the growing workload in guest a to finish")  # fmt: skip
            took = time.monotonic() - start
            time.sleep(4)  # a round or two after the last chunk
            high_a, end_b = actual(a), actual(b)
            host_loaded = a.host_memory() + b.host_memory()
            ooms = (oom_lines(a), oom_lines(b))
            print(f"[manager] guest a wrote {WORK_MIB}M in {took:.0f} s (status {status}); its balloon went "
                  f"{low_a >> 20}M -> {high_a >> 20}M; b {low_b >> 20}M -> {end_b >> 20}M; host holds "
                  f"{host_loaded >> 20}M")  # fmt: skip
            assert status == "0", f"the workload failed\n{last_rounds(tmp_path)}\n{a.exec('dmesg | tail -30').stdout}"
            assert ooms == ("", ""), f"OOM kills: {ooms}\n{last_rounds(tmp_path)}"
            assert high_a >= low_a + (WORK_MIB - 100) * MiB, f"a did not get memory back\n{last_rounds(tmp_path)}"
            assert actual(a) + actual(b) <= BUDGET + 16 * MiB, last_rounds(tmp_path)  # a balloon mid-move
            assert host_loaded <= BUDGET

        # 3. the decision log: a plan inside the budget every round, a reason for every VM, growth for a
        assert proc.returncode == 0, (tmp_path / "manager.stderr").read_text()[-2000:]
        records = decisions(tmp_path)
        assert records, (tmp_path / "manager.stderr").read_text()[-2000:]
        assert all(sum(vm["plan"] for vm in record["vms"].values()) <= BUDGET for record in records)
        assert all(vm["reason"] for record in records for vm in record["vms"].values())
        name = "a/qmp"  # both sockets are qmp.sock: the manager names them by their folder
        grew = [r["vms"][name]["reason"] for r in records if name in r["vms"]
                and ("grow" in r["vms"][name]["reason"] or "pressure" in r["vms"][name]["reason"])]  # fmt: skip
        assert grew, f"the manager never gave guest a memory back\n{last_rounds(tmp_path)}"
        print(f"[manager] {len(records)} rounds; a grew in {len(grew)} of them, e.g. {grew[0]!r}")
        a.exec(f"rm -f {TMPFS}/f*")
