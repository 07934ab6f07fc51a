"""The overcommit controller: a pure function from observations to targets, so it is tested without VMs.

    decision = decide(host, vms, knobs)        # memvisor's policy
    decision = decide_mom(host, vms, knobs)    # oVirt MoM's published balloon rules, the baseline

A VM's *size* is what its guest may touch: the balloon's `actual` (boot RAM minus the balloon) plus the
plugged virtio-mem memory. The budget bounds the sum of the sizes. memvisor's policy, per interval:

1. Demand: from the guest's balloon statistics, used = total - available (balloon pages taken out when the
   guest counts them, as it does with deflate-on-oom), plus a little page cache (`cache_keep`, ChromeOS keeps
   a cache floor too), plus headroom (`headroom_percent` of used, at least `min_headroom`), plus what the
   guest's kernel reserved (size - total). Unknown or stale statistics: the VM keeps its size.
2. Guest pressure (available below `max(min_available, pressure_available_percent of total)`, major faults
   or swap-in above their rates, guest memory PSI above its threshold): the VM gets memory back at once, in a
   large step (`grow_step_percent` of its ceiling) or to its demand, whichever is more.
   Otherwise it gives memory toward its demand at once and takes it by at most `step_percent` of its
   ceiling per interval, and does nothing inside the dead band (`dead_band_percent`).
3. Budget: the effective budget is the configured one, lowered to what the host has (sum of sizes plus
   MemAvailable minus `host_reserve`) and by a step when host PSI or host swap-out shows pressure, but never
   below the sum of floors. If the plan does not fit, every VM keeps its floor and the rest goes by priority
   (higher first, pressured VMs first within a priority, equal shares within a group); a VM is never planned
   below its floor nor above its ceiling. Growth is further held to what is free now, counting a shrinking
   VM at its current size until its balloon has moved (so the host never goes over while floors fit).
4. Floors that cannot fit the budget are reported (event `floors-exceed-budget`) and kept: memvisor never
   squeezes a guest toward OOM for the host's sake.
5. A balloon that did not move for `stuck_intervals` intervals gets its target reset to its actual.

Split: the balloon covers boot RAM; a plan above boot RAM plugs virtio-mem blocks (rounded down so the plan
still holds), and a plan a block or more below boot + plugged unplugs them (a lasting change).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MiB = 1 << 20
STUCK_INTERVALS = 3


@dataclass(frozen=True)
class Knobs:
    """The policy's tunables (config `[policy]`); percentages are of the VM's ceiling unless said."""

    step_percent: float = 3.0
    dead_band_percent: float = 1.0
    grow_step_percent: float = 25.0
    headroom_percent: float = 10.0
    min_headroom: int = 64 * MiB
    cache_keep: int = 32 * MiB
    min_available: int = 48 * MiB
    pressure_available_percent: float = 5.0  # of the guest's total
    major_faults_per_s: float = 100.0
    swap_in_bytes_per_s: float = 256 * 1024
    guest_psi: float = 10.0  # some avg10, percent
    host_psi: float = 10.0  # some avg10, percent
    host_reserve: int = 0
    stuck_intervals: int = STUCK_INTERVALS
    # MoM baseline (mom/policies/balloon.rules)
    mom_pressure_threshold: float = 0.20
    mom_pressure_critical: float = 0.05
    mom_min_guest_free_percent: float = 0.20
    mom_max_balloon_change_percent: float = 0.05
    mom_min_balloon_change_percent: float = 0.0025


@dataclass(frozen=True)
class Limits:
    floor: int
    ceiling: int
    priority: int = 0


@dataclass(frozen=True)
class GuestStats:
    """Balloon statistics in bytes (virtio 1.2 section 5.5.6.3); None where the guest did not report one."""

    total: int | None
    available: int | None
    free: int | None = None
    cache: int | None = None


@dataclass(frozen=True)
class VirtioMem:
    id: str
    size: int
    requested: int
    max_size: int
    block_size: int


@dataclass(frozen=True)
class VmObservation:
    name: str
    limits: Limits
    boot_ram: int  # the balloon's maximum
    actual: int  # balloon actual
    stats: GuestStats | None = None  # None: unknown or stale
    vmem: VirtioMem | None = None
    major_faults_per_s: float = 0.0
    swap_in_bytes_per_s: float = 0.0
    guest_psi: float | None = None
    host_bytes: int | None = None
    stuck: int = 0  # intervals the balloon has not moved toward its target
    stats_note: str | None = None  # why `stats` is None (never reported, stale, incomplete), for the log

    @property
    def size(self) -> int:
        return self.actual + (self.vmem.size if self.vmem else 0)

    @property
    def max_size(self) -> int:
        return self.boot_ram + (self.vmem.max_size if self.vmem else 0)

    @property
    def ceiling(self) -> int:
        return max(1, min(self.limits.ceiling, self.max_size))

    @property
    def floor(self) -> int:
        return min(self.limits.floor, self.ceiling)


@dataclass(frozen=True)
class HostObservation:
    budget: int
    mem_available: int | None = None
    psi_some_avg10: float | None = None
    swap_out_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class Event:
    kind: str  # floors-exceed-budget, host-pressure, guest-pressure, balloon-stuck
    vm: str | None
    message: str


@dataclass(frozen=True)
class VmAction:
    name: str
    size: int  # the planned size (balloon + virtio-mem)
    balloon: int  # balloon target
    vmem_requested: int | None  # virtio-mem requested-size, None without virtio-mem
    reason: str


@dataclass
class Decision:
    actions: list[VmAction]
    budget: int  # effective budget this round
    floors_fit: bool
    events: list[Event] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(a.size for a in self.actions)

    def action(self, name: str) -> VmAction:
        return next(a for a in self.actions if a.name == name)


# --- guest demand and pressure -------------------------------------------------------------------------------


def demand(vm: VmObservation, knobs: Knobs) -> int | None:
    """The size this guest needs now, or None when its statistics are unknown."""
    stats = vm.stats
    if stats is None or stats.total is None or stats.available is None:
        return None
    size = vm.size
    used = max(0, stats.total - stats.available)
    reserved = max(0, size - stats.total)
    if stats.total > size:  # the guest counts balloon pages as used (deflate-on-oom keeps MemTotal)
        used = max(0, used - (vm.boot_ram - vm.actual))
    cache = min(stats.cache or 0, knobs.cache_keep)
    headroom = max(knobs.min_headroom, int(used * knobs.headroom_percent / 100))
    return used + cache + headroom + reserved


def pressure(vm: VmObservation, knobs: Knobs) -> str | None:
    """Why this guest is short of memory, or None."""
    stats = vm.stats
    if stats is not None and stats.available is not None and stats.total is not None:
        threshold = max(knobs.min_available, int(stats.total * knobs.pressure_available_percent / 100))
        if stats.available < threshold:
            return f"available {stats.available >> 20}M below {threshold >> 20}M"
    if vm.major_faults_per_s > knobs.major_faults_per_s:
        return f"{vm.major_faults_per_s:.0f} major faults/s"
    if vm.swap_in_bytes_per_s > knobs.swap_in_bytes_per_s:
        return f"swap-in {vm.swap_in_bytes_per_s / 1024:.0f}K/s"
    if vm.guest_psi is not None and vm.guest_psi > knobs.guest_psi:
        return f"guest memory PSI {vm.guest_psi:.1f}%"
    return None


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def _desired(vm: VmObservation, knobs: Knobs, why: str | None) -> tuple[int, str]:
    """Where the VM should go this interval, before the budget; step limits and the dead band applied."""
    cur, floor, ceiling = vm.size, vm.floor, vm.ceiling
    want = demand(vm, knobs)
    if why is not None:
        grow = int(ceiling * knobs.grow_step_percent / 100)
        return _clamp(max(cur + grow, want or 0), floor, ceiling), f"guest pressure ({why}): give back"
    if vm.stuck >= knobs.stuck_intervals:
        return _clamp(cur, floor, ceiling), "balloon stuck: target reset to actual"
    if want is None:
        note = f" ({vm.stats_note})" if vm.stats_note else ""
        return _clamp(cur, floor, ceiling), f"no guest statistics{note}: hold"
    want = _clamp(want, floor, ceiling)
    step = max(1, int(ceiling * knobs.step_percent / 100))
    if abs(want - cur) <= ceiling * knobs.dead_band_percent / 100:
        return _clamp(cur, floor, ceiling), "within dead band"
    if want < cur:
        return _clamp(max(want, cur - step), floor, ceiling), f"reclaim toward demand {want >> 20}M"
    return _clamp(want, floor, ceiling), f"grow to demand {want >> 20}M"


# --- budget ----------------------------------------------------------------------------------------------------


def effective_budget(host: HostObservation, vms: Sequence[VmObservation], knobs: Knobs) -> tuple[int, list[Event]]:
    """The configured budget, lowered to what the host has and by a step under host pressure (before floors)."""
    budget = host.budget
    events: list[Event] = []
    current = sum(vm.size for vm in vms)
    if host.mem_available is not None:
        room = current + host.mem_available - knobs.host_reserve
        if room < budget:
            budget = room
            events.append(Event("host-low", None, f"host MemAvailable {host.mem_available >> 20}M: budget {room >> 20}M"))
    stressed = host.psi_some_avg10 is not None and host.psi_some_avg10 > knobs.host_psi
    if stressed or host.swap_out_bytes_per_s > 0:
        step = sum(int(vm.ceiling * knobs.step_percent / 100) for vm in vms)
        budget = min(budget, current - step)
        events.append(Event("host-pressure", None, f"host PSI {host.psi_some_avg10}, swap-out "
                                                   f"{host.swap_out_bytes_per_s / 1024:.0f}K/s: reclaiming"))  # fmt: skip
    return max(0, budget), events


def _share(extra: dict[str, int], room: int) -> dict[str, int]:
    """Split `room` between requests: all if they fit, else equal shares, leftovers to those that want more."""
    given = dict.fromkeys(extra, 0)
    pending = {name: want for name, want in extra.items() if want > 0}
    while pending and room > 0:
        share = max(1, room // len(pending))
        for name in sorted(pending, key=lambda n: pending[n]):
            take = min(share, pending[name], room)
            given[name] += take
            room -= take
            pending[name] -= take
            if pending[name] == 0:
                del pending[name]
            if room == 0:
                break
    return given


def fit(plan: dict[str, int], vms: Sequence[VmObservation], budget: int, pressured: set[str]) -> dict[str, int]:
    """Cut `plan` to `budget`: floors first, then by priority (pressured VMs first within one), equal shares."""
    if sum(plan.values()) <= budget:
        return dict(plan)
    out = {vm.name: min(vm.floor, plan[vm.name]) for vm in vms}
    room = budget - sum(out.values())
    groups: dict[tuple[int, bool], list[VmObservation]] = {}
    for vm in vms:
        groups.setdefault((vm.limits.priority, vm.name in pressured), []).append(vm)
    for key in sorted(groups, reverse=True):
        extra = {vm.name: plan[vm.name] - out[vm.name] for vm in groups[key]}
        given = _share(extra, max(0, room))
        for name, amount in given.items():
            out[name] += amount
            room -= amount
    return out


def _hold_growth(plan: dict[str, int], vms: Sequence[VmObservation], budget: int, order: list[str]) -> dict[str, int]:
    """Limit growth to what is free now, counting each VM at max(plan, current); growth up to a floor is exempt."""
    by_name = {vm.name: vm for vm in vms}
    out = dict(plan)
    over = sum(max(out[vm.name], vm.size) for vm in vms) - budget
    for name in reversed(order):  # lowest priority growth is held first
        if over <= 0:
            break
        vm = by_name[name]
        growth = out[name] - max(vm.size, vm.floor)
        if growth > 0:
            cut = min(growth, over)
            out[name] -= cut
            over -= cut
    return out


# --- split between balloon and virtio-mem ----------------------------------------------------------------------


def split(vm: VmObservation, size: int) -> tuple[int, int | None]:
    """(balloon target, virtio-mem requested-size or None) for a planned size."""
    if vm.vmem is None:
        return max(1, min(size, vm.boot_ram)), None
    mem = vm.vmem
    block = max(1, mem.block_size)
    requested = mem.requested
    if size > vm.boot_ram + mem.size:
        requested = min(mem.max_size, (size - vm.boot_ram) // block * block)
    elif size <= vm.boot_ram + mem.size - block:
        requested = min(mem.max_size, -(-max(0, size - vm.boot_ram) // block) * block)
    return max(MiB, min(vm.boot_ram, size - mem.size)), requested


# --- the two policies ----------------------------------------------------------------------------------------


def decide(host: HostObservation, vms: Sequence[VmObservation], knobs: Knobs | None = None) -> Decision:
    """memvisor's policy (see the module docstring)."""
    knobs = knobs or Knobs()
    budget, events = effective_budget(host, vms, knobs)
    floors = sum(vm.floor for vm in vms)
    floors_fit = floors <= host.budget
    if not floors_fit:
        events.append(Event("floors-exceed-budget", None, f"floors {floors >> 20}M exceed the budget "
                            f"{host.budget >> 20}M: keeping floors, the host is over budget"))  # fmt: skip
    budget = max(budget, floors) if floors_fit else floors
    plan: dict[str, int] = {}
    reasons: dict[str, str] = {}
    pressured: set[str] = set()
    for vm in vms:
        why = pressure(vm, knobs)
        if why is not None:
            pressured.add(vm.name)
            events.append(Event("guest-pressure", vm.name, why))
        if vm.stuck >= knobs.stuck_intervals:
            events.append(Event("balloon-stuck", vm.name, f"balloon at {vm.actual >> 20}M for {vm.stuck} intervals"))
        plan[vm.name], reasons[vm.name] = _desired(vm, knobs, why)
    if floors_fit:
        fitted = fit(plan, vms, budget, pressured)
    else:  # keep floors, give pressured guests what they need, take the rest back to floors
        fitted = {vm.name: plan[vm.name] if vm.name in pressured else vm.floor for vm in vms}
        for name in pressured:
            reasons[name] += "; floors exceed the budget, kept anyway"
    for name in plan:
        if fitted[name] < plan[name] and floors_fit:
            reasons[name] += f"; cut to {fitted[name] >> 20}M by the budget"
        elif fitted[name] < plan[name]:
            reasons[name] += "; floors exceed the budget: back to floor"
    order = [vm.name for vm in sorted(vms, key=lambda v: (v.limits.priority, v.name in pressured), reverse=True)]
    held = _hold_growth(fitted, vms, budget, order) if floors_fit else fitted
    for name in plan:
        if held[name] < fitted[name]:
            reasons[name] += "; growth waits for reclaim"
    actions = []
    for vm in vms:
        balloon, requested = split(vm, held[vm.name])
        actions.append(VmAction(vm.name, held[vm.name], balloon, requested, reasons[vm.name]))
    return Decision(actions, budget, floors_fit, events)


def decide_mom(host: HostObservation, vms: Sequence[VmObservation], knobs: Knobs | None = None) -> Decision:
    """MoM's balloon rules: shrink every guest by at most 5 % while host free < 20 %, else grow by 5 %.

    Host free is (budget - sum of sizes) / budget. Shrinking keeps used + guest_free_percent of the balloon,
    where guest_free_percent is 20 % scaled down by host pressure, and negative (force the guest to swap) when
    host free is at or below 5 %. Changes below 0.25 % of the current size are skipped. No floors, no priorities,
    no virtio-mem: the baseline to beat.
    """
    knobs = knobs or Knobs()
    current = sum(vm.size for vm in vms)
    free_percent = (host.budget - current) / host.budget if host.budget > 0 else 0.0
    change = knobs.mom_max_balloon_change_percent
    actions = []
    for vm in vms:
        cur, top = vm.actual, vm.boot_ram
        target, reason = cur, "hold"
        unused = vm.stats.free if vm.stats is not None and vm.stats.free is not None else None
        if free_percent < knobs.mom_pressure_threshold:
            if free_percent <= knobs.mom_pressure_critical:
                guest_free = -0.05 + free_percent
            else:
                guest_free = knobs.mom_min_guest_free_percent * free_percent / knobs.mom_pressure_threshold
            if unused is not None:
                minimum = (cur - unused) + guest_free * cur
                size = max(cur * (1 - change), minimum)
                if size <= cur:
                    target, reason = int(size), "shrink (host free below threshold)"
        elif cur < top:
            minimum = (cur - unused) + knobs.mom_min_guest_free_percent * top if unused is not None else 0
            size = min(cur * (1 + change), top)
            target, reason = int(max(size, minimum)), "grow (host not under pressure)"
        if abs(target - cur) <= knobs.mom_min_balloon_change_percent * cur:
            target, reason = cur, "change too small"
        target = max(MiB, min(target, top))
        size = target + (vm.vmem.size if vm.vmem else 0)
        actions.append(VmAction(vm.name, size, target, None, reason))
    return Decision(actions, host.budget, sum(vm.floor for vm in vms) <= host.budget)


POLICIES = {"memvisor": decide, "mom": decide_mom}
