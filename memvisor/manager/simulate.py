"""A simulated fleet for the controller: model VMs with a demand over time, a slow balloon and stale stats.

    fleet = Fleet.random(1000, seed=1, budget=...)
    for _ in range(100):
        fleet.step(decide)           # one interval: observe (stale), decide, the balloons move (delayed)
    fleet.max_host_over_budget       # bytes the host went over the budget, 0 when it never did

Model of one VM: its guest needs `demand(t)` bytes (a base plus phases of extra use); its balloon moves toward
its target by at most `balloon_rate` bytes per interval (the guest's driver is not instant); the manager sees
statistics `stale` intervals old (0 or 1: the manager polls stats every interval); a guest whose size falls below its need is counted as an OOM.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memvisor.manager.policy import Decision, GuestStats, HostObservation, Knobs, Limits, VmObservation

MiB = 1 << 20
RAMP = 12  # a phase of 300M grows 25M per interval: twice that (stale stats) is within headroom - dead band
Policy = Callable[[HostObservation, Sequence[VmObservation], Knobs], Decision]


@dataclass
class ModelVm:
    name: str
    boot_ram: int
    limits: Limits
    base: int  # what the guest always uses
    phases: list[tuple[int, int, int]]  # (start interval, end interval, extra bytes)
    balloon_rate: int = 64 * MiB  # bytes the balloon moves per interval
    stale: int = 1  # intervals of statistics delay
    actual: int = 0
    target: int = 0
    history: list[int] = field(default_factory=list)  # demand per interval, for staleness
    ooms: int = 0

    def __post_init__(self) -> None:
        self.actual = self.target = self.boot_ram

    def need(self, t: int) -> int:
        """Base use plus each phase's extra, which ramps up over `RAMP` intervals (a workload allocating)."""
        return self.base + sum(extra * min(RAMP, t - start + 1) // RAMP for start, end, extra in self.phases
                               if start <= t < end)  # fmt: skip

    def observe(self, t: int) -> VmObservation:
        seen = self.history[-1 - self.stale] if len(self.history) > self.stale else self.need(t)
        total = self.actual - 32 * MiB  # the kernel's reserve
        stats = GuestStats(total=total, available=max(0, total - seen), free=max(0, total - seen), cache=0)
        return VmObservation(self.name, self.limits, self.boot_ram, self.actual, stats)

    def apply(self, target: int) -> None:
        self.target = target
        if target < self.actual:
            self.actual = max(target, self.actual - self.balloon_rate)
        else:
            self.actual = min(target, self.actual + self.balloon_rate * 4)  # deflating is cheap

    def tick(self, t: int) -> None:
        need = self.need(t)
        self.history.append(need)
        if need + 32 * MiB > self.actual:
            self.ooms += 1


@dataclass
class Fleet:
    vms: list[ModelVm]
    budget: int
    knobs: Knobs = field(default_factory=Knobs)
    t: int = 0
    max_host_over_budget: int = 0
    host_samples: list[int] = field(default_factory=list)

    @classmethod
    def random(cls, count: int, *, seed: int, budget_per_vm: int = 640 * MiB, boot_ram: int = 1 << 30) -> Fleet:
        rng = random.Random(seed)
        vms = []
        for i in range(count):
            base = rng.randrange(128, 320) * MiB
            phases = []
            end = 0
            for _ in range(rng.randrange(0, 3)):  # one after the other: one workload ramps at a time
                start = end + rng.randrange(0, 50)
                end = start + rng.randrange(5, 40)
                phases.append((start, end, rng.randrange(50, 300) * MiB))
            limits = Limits(floor=base + 96 * MiB, ceiling=boot_ram, priority=rng.randrange(0, 3))
            vms.append(ModelVm(f"vm{i}", boot_ram, limits, base, phases, stale=rng.randrange(0, 2)))
        fleet = cls(vms, budget_per_vm * count)
        # start inside the budget: a manager attaches to a host that is not over it yet
        for vm in vms:
            vm.actual = vm.target = min(boot_ram, budget_per_vm)
        return fleet

    @property
    def host(self) -> int:
        return sum(vm.actual for vm in self.vms)

    def step(self, policy: Policy) -> Decision:
        observations = [vm.observe(self.t) for vm in self.vms]
        decision = policy(HostObservation(self.budget), observations, self.knobs)
        targets = {action.name: action.balloon for action in decision.actions}
        for vm in self.vms:
            vm.apply(targets[vm.name])
            vm.tick(self.t)
        self.host_samples.append(self.host)
        self.max_host_over_budget = max(self.max_host_over_budget, self.host - self.budget)
        self.t += 1
        return decision

    @property
    def ooms(self) -> int:
        return sum(vm.ooms for vm in self.vms)
