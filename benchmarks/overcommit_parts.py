"""The pure parts of benchmarks/overcommit_scenario.py (issue 10's scenario): the modes, the phase schedule, the
guest workload scripts and their status lines, the host counters (/proc/vmstat, a cgroup's memory.events), the
time over budget from samples, and the markdown table. No VM, no cgroup, no lab: unit-tested in
tests/unit/test_overcommit_scenario.py.

Sources: Documentation/admin-guide/cgroup-v2.rst (memory.current, memory.swap.current, memory.events: "max" counts
the times usage was about to go over memory.max, "oom_kill" the processes killed), proc(5) (/proc/vmstat pswpout:
pages swapped out since boot), mm/oom_kill.c ("Killed process PID (COMM)", once per kill).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MiB = 1 << 20
GiB = 1 << 30


# --- the modes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    reporting: bool  # virtio-balloon free-page-reporting=on
    policy: str | None  # `memvisor manager --policy ...`, or None: no manager
    limited: bool = True  # the cgroup's memory.max is the budget (else "max": the unconstrained baseline)


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("none", "no manager, no reporting", reporting=False, policy=None),
        Mode("reporting", "free page reporting only", reporting=True, policy=None),
        Mode("mom", "MoM-like rules (--policy mom)", reporting=True, policy="mom"),
        Mode("memvisor", "memvisor's manager", reporting=True, policy="memvisor"),
        Mode("unconstrained", "unconstrained host (no memory.max)", reporting=True, policy=None, limited=False),
    )
}
# The four runs; "unconstrained" is the baseline its slowdown goal (at most 10 %) compares with.
DEFAULT_MODES = "none,reporting,mom,memvisor"


def parse_modes(text: str) -> list[Mode]:
    """`--modes reporting,memvisor` as modes in the order given; an unknown or repeated name is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--modes is empty: name one or more of {','.join(MODES)}")
    unknown = [name for name in names if name not in MODES]
    if unknown:
        raise ValueError(f"--modes: unknown mode {unknown[0]!r}; the modes are {','.join(MODES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--modes names a mode twice: {text!r}")
    return [MODES[name] for name in names]


# --- the scenario and its phases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    budget: int  # the cgroup's memory.max, bytes
    guest_memory: int  # each guest's RAM
    hold: int  # what a "hold" workload fills (tmpfs) and keeps
    hold_seconds: float  # how long it keeps it before freeing it
    read: int  # the file guest c reads (its page cache grows by that much)
    gap_seconds: float  # idle time after each phase (reporting and the manager react)
    settle_seconds: float  # idle time after boot, before the first phase
    zram: int  # the zram swap device's disksize


FULL = Scenario(budget=2 * GiB, guest_memory=1 * GiB, hold=700 * MiB, hold_seconds=60, read=600 * MiB,
                gap_seconds=30, settle_seconds=30, zram=2 * GiB)  # fmt: skip
# --quick: a smoke run; a smaller budget, so that the smaller workloads still press against it. In the lab run of
# 2026-12-01 (holds of 400M) the manager's share of 1280M (1130M after the VMMs' own memory) could not hold the two
# idle guests' 256M floors and a's demand (635M): a's fill took 212 s against 67 s with reporting only, so a hold
# now fits beside the floors, as in the full scenario (where only the a+b phase cannot fit). Filling runs at 6-9 MB/s
# in the lab (every first touch of guest memory is a nested page fault under TCG): 256M keeps a mode near 5 min.
QUICK = Scenario(budget=1280 * MiB, guest_memory=1 * GiB, hold=256 * MiB, hold_seconds=20, read=256 * MiB,
                 gap_seconds=10, settle_seconds=10, zram=1 * GiB)  # fmt: skip

GUESTS = ("a", "b", "c")
SEED = 4 * MiB  # the random block a hold workload repeats: incompressible for zram, cheap to write in the guest


@dataclass(frozen=True)
class Workload:
    guest: str
    kind: str  # "hold" (fill a tmpfs, keep it, free it) or "read" (read a file once: page cache)
    size: int

    @property
    def key(self) -> str:
        return f"{self.guest} {self.kind} {self.size >> 20}M"


@dataclass(frozen=True)
class Phase:
    name: str
    workloads: tuple[Workload, ...]
    gap_seconds: float  # idle time after its workloads have all finished


def phase_schedule(scenario: Scenario) -> list[Phase]:
    """Issue 10's phases: a holds then frees; then b; then c reads a file (page cache); then a and b at once."""
    hold, read, gap = scenario.hold, scenario.read, scenario.gap_seconds
    return [
        Phase("a holds", (Workload("a", "hold", hold),), gap),
        Phase("b holds", (Workload("b", "hold", hold),), gap),
        Phase("c reads", (Workload("c", "read", read),), gap),
        Phase("a+b hold", (Workload("a", "hold", hold), Workload("b", "hold", hold)), gap),
    ]


def schedule_seconds(scenario: Scenario) -> float:
    """The fixed (non-workload) time of a run: settle, each hold's hold time, each gap."""
    phases = phase_schedule(scenario)
    holds = sum(max((scenario.hold_seconds for w in p.workloads if w.kind == "hold"), default=0) for p in phases)
    return scenario.settle_seconds + holds + sum(p.gap_seconds for p in phases)


# --- guest workload scripts and their status line ----------------------------------------------------------------

WORK_DIR = "/mnt/wl"
READ_DEVICE = "/dev/pmem0"
_UPTIME = "$(cut -d' ' -f1 /proc/uptime)"


def hold_script(size: int, hold_seconds: float, status: str, directory: str = WORK_DIR) -> str:
    """A guest shell script: fill `directory` (a tmpfs) with `size` bytes of a repeated random block, keep it
    `hold_seconds`, delete it; write "STATUS START FILLED END" (guest uptime seconds) to `status`."""
    if size <= 0 or size % SEED:
        raise ValueError(f"hold size must be a positive multiple of {SEED >> 20}M, got {size}")
    chunks = size // SEED - 1  # the seed itself is the first chunk
    return (
        f"t0={_UPTIME}; rc=0; head -c {SEED} /dev/urandom > {directory}/seed || rc=1; i=0; "
        f"while [ $rc = 0 ] && [ $i -lt {chunks} ]; do cat {directory}/seed >> {directory}/data || rc=1; "
        f"i=$((i + 1)); done; t1={_UPTIME}; [ $rc = 0 ] && sleep {hold_seconds:g}; "
        f"rm -f {directory}/seed {directory}/data; echo $rc $t0 $t1 {_UPTIME} > {status}"
    )


def read_script(status: str, device: str = READ_DEVICE) -> str:
    """A guest shell script: read `device` once through the page cache; "STATUS START READ END" to `status`."""
    return f"t0={_UPTIME}; cat {device} > /dev/null; rc=$?; t1={_UPTIME}; echo $rc $t0 $t1 $t1 > {status}"


def background(script: str) -> str:
    """Run `script` detached from the agent's exec (which returns at once)."""
    quoted = script.replace("'", "'\"'\"'")
    return f"(sh -c '{quoted}') > /dev/null 2>&1 &"


@dataclass(frozen=True)
class WorkloadResult:
    status: int
    work_seconds: float  # filling (hold) or reading (read): what memory pressure slows down
    total_seconds: float  # start to freed


def parse_status(text: str) -> WorkloadResult | None:
    """A workload's status line "RC START WORKED END" (guest uptimes); None while it is not written yet."""
    words = text.split()
    if len(words) != 4:
        return None
    try:
        status = int(words[0])
        start, worked, end = (float(word) for word in words[1:])
    except ValueError:
        return None
    if not start <= worked <= end:
        return None
    return WorkloadResult(status, round(worked - start, 2), round(end - start, 2))


# --- host counters ------------------------------------------------------------------------------------------------


def counter_delta(before: Mapping[str, int], after: Mapping[str, int], key: str) -> int:
    """How much counter `key` grew (a missing key counts as 0; a counter never goes back, so never below 0)."""
    return max(0, after.get(key, 0) - before.get(key, 0))


OOM_KILL = re.compile(r"Killed process \d+")


def count_oom_kills(dmesg: str) -> int:
    """Processes the guest's OOM killer killed: mm/oom_kill.c logs "Killed process PID (COMM)" once per kill."""
    return len(OOM_KILL.findall(dmesg))


# --- samples of the cgroup ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    time: float  # seconds (monotonic)
    current: int  # memory.current: what the VMs hold in host RAM
    swap: int  # memory.swap.current: what of theirs is in swap


def over_budget_seconds(samples: Sequence[Sample], budget: int) -> float:
    """Seconds the VMs' memory (in RAM plus in swap) was over the budget: each sample holds until the next."""
    total = 0.0
    for sample, following in zip(samples, samples[1:], strict=False):
        if sample.current + sample.swap > budget:
            total += following.time - sample.time
    return round(total, 1)


def at_limit_seconds(samples: Sequence[Sample], budget: int, slack: int = 16 * MiB) -> float:
    """Seconds memory.current was pressed against memory.max (within `slack`): the kernel reclaiming for the VMs."""
    total = 0.0
    for sample, following in zip(samples, samples[1:], strict=False):
        if sample.current >= budget - slack:
            total += following.time - sample.time
    return round(total, 1)


def average_held(samples: Sequence[Sample]) -> int:
    """Time-weighted mean of memory.current (bytes); a single sample is its own mean; no sample is 0."""
    if len(samples) == 1:
        return samples[0].current
    span = samples[-1].time - samples[0].time if samples else 0.0
    if span <= 0:
        return 0
    weighted = sum(s.current * (n.time - s.time) for s, n in zip(samples, samples[1:], strict=False))
    return int(weighted / span)


# --- the table ------------------------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: Mode
    pswpout: int = 0  # host pages swapped out during the run
    over_budget: float = 0.0  # seconds
    at_limit: float = 0.0  # seconds
    max_events: int = 0  # memory.events "max" growth
    cgroup_oom_kills: int = 0  # memory.events "oom_kill" growth (host side)
    guest_oom_kills: int | None = None  # None: could not be read
    workloads: dict[str, WorkloadResult | None] = field(default_factory=dict)  # by Workload.key + phase
    average_held: int = 0
    peak_held: int = 0
    manager_budget: int | None = None
    error: str | None = None


def workload_columns(phases: Sequence[Phase]) -> list[str]:
    """One column per workload of the schedule, named by phase and guest: "a holds", "a+b hold: b", ..."""
    columns = []
    for phase in phases:
        for workload in phase.workloads:
            columns.append(phase.name if len(phase.workloads) == 1 else f"{phase.name}: {workload.guest}")
    return columns


def _seconds(result: WorkloadResult | None) -> str:
    if result is None:
        return "-"
    return f"{result.work_seconds:.1f}" if result.status == 0 else f"failed ({result.status})"


def render_table(results: Sequence[ModeResult], phases: Sequence[Phase], scenario: Scenario) -> str:
    """The markdown table, a row per mode; workload columns give the filling or reading time in seconds."""
    columns = workload_columns(phases)
    header = ["mode", "host pswpout (pages)", "over budget (s)", "at memory.max (s)", "memory.events max",
              "guest OOM kills", "host OOM kills", *[f"{c} (s)" for c in columns], "host held avg (MiB)", "peak (MiB)"]  # fmt: skip
    lines = [
        f"budget {scenario.budget >> 20}M (cgroup memory.max), three {scenario.guest_memory >> 20}M guests; "
        f"holds of {scenario.hold >> 20}M for {scenario.hold_seconds:g} s, a {scenario.read >> 20}M read; "
        "workload columns: seconds to fill (hold) or read",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for result in results:
        if result.error is not None:
            cells = [result.mode.label, f"failed: {result.error}"] + [""] * (len(header) - 2)
        else:
            cells = [
                result.mode.label,
                str(result.pswpout),
                f"{result.over_budget:.1f}",
                f"{result.at_limit:.1f}",
                str(result.max_events),
                "?" if result.guest_oom_kills is None else str(result.guest_oom_kills),
                str(result.cgroup_oom_kills),
                *[_seconds(result.workloads.get(column)) for column in columns],
                str(result.average_held >> 20),
                str(result.peak_held >> 20),
            ]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
