"""The overcommit controller as pure functions: examples, then hypothesis properties over random fleets."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.manager.policy import (
    Decision,
    GuestStats,
    HostObservation,
    Knobs,
    Limits,
    VirtioMem,
    VmObservation,
    decide,
    decide_mom,
    demand,
    pressure,
)
from memvisor.manager.simulate import Fleet

MiB = 1 << 20
GiB = 1 << 30
KNOBS = Knobs()


def vm(name: str = "a", *, actual: int = GiB, used: int = 200 * MiB, cache: int = 0, floor: int = 256 * MiB,
       ceiling: int = GiB, priority: int = 0, **kwargs: object) -> VmObservation:  # fmt: skip
    total = actual - 40 * MiB
    stats = GuestStats(total=total, available=total - used, free=total - used - cache, cache=cache)
    return VmObservation(name, Limits(floor, ceiling, priority), GiB, actual, stats, **kwargs)  # type: ignore[arg-type]


# --- examples ----------------------------------------------------------------------------------------------


def test_demand_is_used_plus_cache_kept_plus_headroom_plus_kernel_reserve() -> None:
    observed = vm(used=500 * MiB, cache=300 * MiB)
    assert demand(observed, KNOBS) == 500 * MiB + 32 * MiB + 64 * MiB + 40 * MiB


def test_demand_removes_balloon_pages_the_guest_counts_as_used() -> None:
    # deflate-on-oom: MemTotal stays at boot size and the balloon's 512M show as used
    stats = GuestStats(total=GiB - 40 * MiB, available=GiB - 40 * MiB - 712 * MiB, cache=0)
    observed = VmObservation("a", Limits(256 * MiB, GiB), GiB, 512 * MiB, stats)
    assert demand(observed, KNOBS) == 200 * MiB + 64 * MiB


def test_unknown_stats_mean_hold() -> None:
    observed = VmObservation("a", Limits(256 * MiB, GiB), GiB, 800 * MiB, None)
    action = decide(HostObservation(4 * GiB), [observed]).action("a")
    assert action.size == 800 * MiB and "no guest statistics" in action.reason


def test_idle_guest_is_reclaimed_in_small_steps() -> None:
    action = decide(HostObservation(4 * GiB), [vm(used=100 * MiB)]).action("a")
    step = int(GiB * KNOBS.step_percent / 100)
    assert action.size == GiB - step and action.balloon == GiB - step
    assert "reclaim" in action.reason


def test_dead_band_holds() -> None:
    observed = vm(actual=400 * MiB, used=264 * MiB)  # demand 264+64+40 = 368M... close to 400
    want = demand(observed, KNOBS)
    assert want is not None
    near = vm(actual=want + 5 * MiB, used=264 * MiB)
    # the kernel reserve follows the size, so recompute at the new size
    assert decide(HostObservation(4 * GiB), [near]).action("a").reason == "within dead band"


def test_pressure_gives_back_at_once_in_a_large_step() -> None:
    starving = vm(actual=400 * MiB, used=340 * MiB)  # available 20M < 48M
    assert pressure(starving, KNOBS) is not None
    action = decide(HostObservation(4 * GiB), [starving]).action("a")
    assert action.size >= 400 * MiB + GiB // 4
    assert "pressure" in action.reason


def test_major_faults_swap_in_and_guest_psi_are_pressure() -> None:
    assert pressure(vm(major_faults_per_s=500.0), KNOBS)
    assert pressure(vm(swap_in_bytes_per_s=4 * MiB), KNOBS)
    assert pressure(vm(guest_psi=30.0), KNOBS)
    assert pressure(vm(), KNOBS) is None


def test_floors_that_do_not_fit_are_reported_and_kept() -> None:
    vms = [vm("a", floor=700 * MiB), vm("b", floor=700 * MiB)]
    decision = decide(HostObservation(GiB), vms)
    assert not decision.floors_fit
    assert any(event.kind == "floors-exceed-budget" for event in decision.events)
    assert all(action.size >= 700 * MiB for action in decision.actions)


def test_budget_cut_goes_by_priority() -> None:
    vms = [vm("low", used=700 * MiB, priority=0), vm("high", used=700 * MiB, priority=5)]
    decision = decide(HostObservation(1400 * MiB), vms)
    assert decision.total <= 1400 * MiB
    assert decision.action("high").size > decision.action("low").size
    assert decision.action("low").size >= 256 * MiB


def test_growth_waits_until_the_others_have_given_back() -> None:
    # a needs memory, b holds 1G that it does not need; the budget has no room until b's balloon moves
    a = vm("a", actual=400 * MiB, used=350 * MiB)
    b = vm("b", actual=GiB, used=100 * MiB)
    decision = decide(HostObservation(GiB + 400 * MiB), [a, b])
    assert decision.action("a").size == 400 * MiB  # no room yet: b still holds its memory
    assert decision.action("b").size < GiB
    b_after = vm("b", actual=decision.action("b").size, used=100 * MiB)
    later = decide(HostObservation(GiB + 400 * MiB), [a, b_after])
    assert later.action("a").size > 400 * MiB


def test_stuck_balloon_gets_target_reset_to_actual() -> None:
    decision = decide(HostObservation(4 * GiB), [vm(actual=900 * MiB, used=100 * MiB, stuck=3)])
    action = decision.action("a")
    assert action.balloon == 900 * MiB
    assert any(event.kind == "balloon-stuck" for event in decision.events)


def test_host_memavailable_lowers_the_budget() -> None:
    vms = [vm("a", used=100 * MiB), vm("b", used=100 * MiB)]
    decision = decide(HostObservation(8 * GiB, mem_available=0, psi_some_avg10=50.0), vms)
    assert decision.total < 2 * GiB
    assert {event.kind for event in decision.events} >= {"host-low", "host-pressure"}


def test_virtio_mem_grows_past_boot_ram_and_unplugs_for_lasting_shrink() -> None:
    mem = VirtioMem("vm0", size=0, requested=0, max_size=2 * GiB, block_size=2 * MiB)
    hungry = VmObservation("a", Limits(256 * MiB, 3 * GiB), GiB, GiB,
                           GuestStats(total=GiB - 40 * MiB, available=10 * MiB), vmem=mem)  # fmt: skip
    action = decide(HostObservation(8 * GiB), [hungry]).action("a")
    assert action.balloon == GiB
    assert action.vmem_requested is not None and action.vmem_requested > 0
    assert action.vmem_requested % (2 * MiB) == 0
    plugged = VirtioMem("vm0", size=GiB, requested=GiB, max_size=2 * GiB, block_size=2 * MiB)
    idle = VmObservation("a", Limits(256 * MiB, 3 * GiB), GiB, GiB,
                         GuestStats(total=2 * GiB - 40 * MiB, available=2 * GiB - 300 * MiB), vmem=plugged)  # fmt: skip
    action = decide(HostObservation(8 * GiB), [idle]).action("a")
    assert action.vmem_requested is not None and action.vmem_requested < GiB
    assert action.balloon + plugged.size == action.size


def test_mom_baseline_shrinks_by_at_most_5_percent_under_pressure_and_grows_without() -> None:
    vms = [vm("a", used=100 * MiB), vm("b", used=100 * MiB)]
    tight = decide_mom(HostObservation(2 * GiB), vms)  # host free 0 %: critical
    assert all(a.balloon == int(GiB * 0.95) for a in tight.actions)
    loose = decide_mom(HostObservation(8 * GiB), [vm("a", actual=512 * MiB, used=100 * MiB)])
    assert loose.action("a").balloon == int(512 * MiB * 1.05)


# --- properties ----------------------------------------------------------------------------------------------


@st.composite
def fleets(draw: st.DrawFn) -> tuple[HostObservation, list[VmObservation]]:
    count = draw(st.integers(1, 8))
    vms = []
    for i in range(count):
        boot = draw(st.sampled_from([512 * MiB, GiB, 2 * GiB]))
        floor = draw(st.integers(64, boot >> 20)) * MiB
        ceiling = draw(st.integers(floor >> 20, boot >> 20)) * MiB
        actual = draw(st.integers(64, boot >> 20)) * MiB
        if draw(st.booleans()):
            total = max(MiB, actual - draw(st.integers(0, 64)) * MiB)
            available = draw(st.integers(0, total >> 20)) * MiB
            stats: GuestStats | None = GuestStats(total, available, cache=draw(st.integers(0, 512)) * MiB)
        else:
            stats = None
        vms.append(VmObservation(
            f"vm{i}", Limits(floor, ceiling, draw(st.integers(0, 3))), boot, actual, stats,
            major_faults_per_s=draw(st.sampled_from([0.0, 1000.0])), stuck=draw(st.integers(0, 4)),
        ))  # fmt: skip
    budget = draw(st.integers(0, sum(v.boot_ram for v in vms) >> 20)) * MiB
    mem_available = draw(st.one_of(st.none(), st.integers(0, 4096).map(lambda m: m * MiB)))
    psi = draw(st.one_of(st.none(), st.floats(0, 100)))
    return HostObservation(budget, mem_available, psi), vms


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_no_vm_below_floor_or_above_ceiling(fleet: tuple[HostObservation, list[VmObservation]]) -> None:
    host, vms = fleet
    decision = decide(host, vms)
    for observed in vms:
        action = decision.action(observed.name)
        assert observed.floor <= action.size <= observed.ceiling
        assert 0 < action.balloon <= observed.boot_ram


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_total_never_above_budget_when_floors_fit(fleet: tuple[HostObservation, list[VmObservation]]) -> None:
    host, vms = fleet
    decision = decide(host, vms)
    if sum(v.floor for v in vms) <= host.budget:
        assert decision.floors_fit
        assert decision.total <= host.budget
    else:
        assert not decision.floors_fit and any(e.kind == "floors-exceed-budget" for e in decision.events)


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_reclaim_steps_are_small(fleet: tuple[HostObservation, list[VmObservation]]) -> None:
    """Unless the budget cuts, no VM loses more than step_percent of its ceiling in one interval."""
    host, vms = fleet
    decision = decide(host, vms)
    for observed in vms:
        action = decision.action(observed.name)
        if "budget" in action.reason:
            continue  # the budget cut: allowed to move further
        if pressure(observed, KNOBS) is None and observed.floor <= observed.size <= observed.ceiling:
            assert observed.size - action.size <= observed.ceiling * KNOBS.step_percent / 100 + 1


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_pressure_never_shrinks_a_guest_unless_the_budget_must(fleet: tuple[HostObservation, list[VmObservation]]) -> None:
    host, vms = fleet
    decision = decide(host, vms)
    for observed in vms:
        action = decision.action(observed.name)
        if pressure(observed, KNOBS) is not None and "budget" not in action.reason:
            assert action.size >= min(observed.size, observed.ceiling)


# --- the simulated fleet ------------------------------------------------------------------------------------


def test_simulated_fleet_of_1000_stays_in_budget_without_oom() -> None:
    fleet = Fleet.random(1000, seed=7)
    durations = []

    def timed(host: HostObservation, vms: Sequence[VmObservation], knobs: Knobs) -> Decision:
        start = time.perf_counter()
        decision = decide(host, vms, knobs)
        durations.append(time.perf_counter() - start)
        return decision

    for _ in range(30):
        fleet.step(timed)
    durations.sort()
    # The time of a round is printed, not asserted: timings are a benchmark's job (a unit test under coverage
    # on a loaded 2-core machine measured 53 ms for what takes ~20 ms alone).
    print(f"median decide() over 1000 VMs: {durations[len(durations) // 2] * 1000:.1f} ms")
    assert fleet.max_host_over_budget <= 0
    assert fleet.ooms == 0


def test_simulated_fleet_reclaims_idle_memory() -> None:
    fleet = Fleet.random(50, seed=3)
    start = fleet.host
    for _ in range(40):
        fleet.step(decide)
    assert fleet.host < start * 0.9
    assert fleet.max_host_over_budget <= 0


def test_memvisor_beats_the_mom_baseline_in_a_tight_simulated_fleet() -> None:
    """200 VMs, 400M of budget each (the floors fit): MoM's rules starve guests and overshoot; memvisor does not."""
    results = {}
    for name, policy in (("memvisor", decide), ("mom", decide_mom)):
        fleet = Fleet.random(200, seed=11, budget_per_vm=400 * MiB)
        for _ in range(120):
            fleet.step(policy)
        results[name] = fleet
    assert results["memvisor"].ooms == 0 and results["memvisor"].max_host_over_budget <= 0
    assert results["mom"].ooms > 0 and results["mom"].max_host_over_budget > 0
    assert sum(results["memvisor"].host_samples) < sum(results["mom"].host_samples)
