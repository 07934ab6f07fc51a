"""The manager's loop: find VMs, observe them and the host, decide (a pure policy), act, log, wait.

    manager = Manager(["/run/vms/*.sock"], config, budget=2 << 30)
    manager.run()              # until stop() or SIGTERM; SIGHUP reloads the config (CLI wires the signals)

Each round (every `interval` s, at once when the host PSI trigger fires or on reload):
1. sockets: each pattern is a path or a glob; a VM is named after its socket (`web.sock`: web; two `qmp.sock`
   in different folders: `dir/qmp`), the name its config table has; a new socket joins (connected, stats polling turned on), a VM
   whose connection fails leaves (logged, retried when its socket is there again);
2. observe each VM (`VmLink.sample`, all VMs read at once by a small thread pool, each link by one worker, the
   results then taken in the VMs' order as if read one after the other) and the host (MemAvailable, PSI,
   swap-out rate);
3. rates: major faults and swap-in per second from the guest's counters between two stats updates; stale
   statistics (older than three intervals and 2 s) count as unknown; a balloon whose actual did not move while its
   target differs counts as stuck;
4. decide, then act only on changes (balloon target, virtio-mem requested-size), and log every decision with its
   reason (a JSON line per VM and round in the decision log; a text line whenever a VM's target or the kind of
   its reason changes, e.g. from "reclaim" to "no guest statistics (stale 12 s): hold", and on every event).

A VM that answers something unexpected (a malformed reply, an error the loop did not foresee) leaves with a
logged reason and joins again when it answers sensibly; one VM never stops the manager for the others.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from memvisor.errors import MemvisorError
from memvisor.manager.config import Config
from memvisor.manager.host import HostInputs, PsiTrigger, wait
from memvisor.manager.policy import POLICIES, Decision, HostObservation, Limits, VmObservation
from memvisor.manager.vm import Sample, VmLink, vm_name

log = logging.getLogger("memvisor.manager")

MiB = 1 << 20
STALE_INTERVALS = 3
# Beyond the intervals: last-update has 1 s resolution, and a device skips a polling tick while the guest still
# holds the stats buffer (a slow guest answers every other tick), so fresh statistics can look a little old.
STALE_SLACK = 2.0
STUCK_TOLERANCE = MiB  # drivers move in pages and 1 MiB batches (Linux: 256 PFNs per request)
# VMs read at once: each read waits on QMP replies and the guest agent (0.6-2.8 s each in the lab), not on the CPU
SAMPLE_WORKERS = 16
Connect = Callable[[str, float, "str | None"], VmLink]


def _connect(path: str, interval: float, cgroup: str | None) -> VmLink:
    return VmLink.connect(path, interval, cgroup=cgroup)


@dataclass
class Tracked:
    """What the loop remembers about one VM between rounds."""

    link: VmLink
    target: int | None = None  # last balloon target sent
    requested: int | None = None  # last virtio-mem requested-size sent
    last_actual: int | None = None
    stuck: int = 0
    counters: tuple[float, int | None, int | None] | None = None  # (stats time, major faults, swap-in)
    rates: tuple[float, float] = (0.0, 0.0)
    sample: Sample | None = None
    logged: tuple[int | None, str] | None = None  # (target, reason kind) last written to the text log
    sample_seconds: float = 0.0  # how long the last sample took (QMP replies, the guest agent)


@dataclass
class RoundRecord:
    """One round as logged and plotted."""

    time: float
    budget: int
    host_total: int | None  # the VMs' host memory, summed where known
    mem_available: int | None
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    took: float = 0.0  # seconds the round took (observe, decide, act)


class Manager:
    def __init__(
        self,
        patterns: Sequence[str],
        config: Config,
        budget: int,
        *,
        host_inputs: HostInputs | None = None,
        connect: Connect = _connect,
        decision_log: IO[str] | None = None,
        psi_trigger: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.patterns = list(patterns)
        self.config = config
        self.budget = budget
        self.host = host_inputs or HostInputs()
        self.connect = connect
        self.decision_log = decision_log
        self.clock = clock
        self.wall = wall
        self.vms: dict[str, Tracked] = {}
        self.failed: dict[str, str] = {}  # path -> last error, logged once
        self.history: list[RoundRecord] = []
        self.listeners: list[Callable[[RoundRecord, Decision], None]] = []
        self.trigger = PsiTrigger.open() if psi_trigger else None
        self._swap = (self.clock(), self.host.swap_out_bytes())
        self._stop = threading.Event()
        self._reload: Callable[[], Config] | None = None
        self._reload_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pool = ThreadPoolExecutor(max_workers=SAMPLE_WORKERS, thread_name_prefix="manager-sample")

    # --- control from signal handlers / other threads ------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def request_reload(self, load: Callable[[], Config]) -> None:
        self._reload = load
        self._reload_requested = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # no worker holds a link once this returns
        for tracked in self.vms.values():
            tracked.link.close()
        self.vms.clear()
        if self.trigger is not None:
            self.trigger.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- sockets ----------------------------------------------------------------------------------------------

    def sockets(self) -> list[str]:
        found: list[str] = []
        for pattern in self.patterns:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            found += [path for path in matches if os.path.exists(path) and path not in found]
        return found

    def discover(self) -> None:
        present = self.sockets()
        for path in list(self.vms):
            if path not in present:
                self._leave(path, "its socket is gone")
        stems = [vm_name(path) for path in present]
        taken = {tracked.link.name for tracked in self.vms.values()}
        for path in present:
            if path in self.vms:
                continue
            name = vm_name(path)
            if stems.count(name) > 1 or name in taken:  # e.g. dir1/qmp.sock and dir2/qmp.sock
                name = f"{Path(path).parent.name}/{name}"
            cgroup = self.config.for_vm(name).cgroup
            try:
                link = self.connect(path, self.config.interval, cgroup)
                link.name = name
            except MemvisorError as err:
                if self.failed.get(path) != str(err):
                    log.warning("%s: cannot manage it yet: %s", path, err)
                    self.failed[path] = str(err)
                continue
            self.failed.pop(path, None)
            self.vms[path] = Tracked(link)
            taken.add(name)
            log.info("%s joined (%s, boot RAM %dM, host memory from %s, guest PSI %s)", link.name, link.kind,
                     link.boot_ram >> 20, "cgroup " + str(link.cgroup) if link.cgroup else
                     ("x-query-host-memory" if link.has_host_memory else "RSS"),
                     "via agent" if link.has_agent else "none")  # fmt: skip

    def _leave(self, path: str, why: str) -> None:
        tracked = self.vms.pop(path)
        tracked.link.close()
        log.info("%s left (%s)", tracked.link.name, why)

    # --- one round ----------------------------------------------------------------------------------------------

    def _sample_all(self) -> dict[str, tuple[Sample, float] | Exception]:
        """Read every VM at once: per path, its sample and how long its own read took, or what it raised.

        Each link goes to one worker and nothing else touches it until every read is back (this returns only then;
        discover, act, _repoll and close run in the loop's thread outside it), so a link's QMP connection, which
        takes one command at a time, is only ever used by one thread at a time."""

        def read(link: VmLink) -> tuple[Sample, float]:
            asked = self.clock()
            sample = link.sample()
            return sample, self.clock() - asked

        futures = {path: self._pool.submit(read, tracked.link) for path, tracked in self.vms.items()}
        results: dict[str, tuple[Sample, float] | Exception] = {}
        for path, future in futures.items():
            try:
                results[path] = future.result()
            except Exception as err:  # noqa: BLE001 (told apart in observe, as if raised there)
                results[path] = err
        return results

    def observe(self) -> tuple[HostObservation, list[VmObservation]]:
        interval = self.config.interval
        now_wall = self.wall()
        observations = []
        results = self._sample_all()
        for path, tracked in list(self.vms.items()):
            result = results[path]
            if isinstance(result, MemvisorError):
                self._leave(path, str(result))
                continue
            if isinstance(result, Exception):  # a malformed reply: this VM leaves, the others go on
                self._leave(path, f"unexpected reply ({type(result).__name__}: {result})")
                continue
            sample, tracked.sample_seconds = result
            tracked.sample = sample
            away = tracked.target is not None and abs(sample.actual - tracked.target) > STUCK_TOLERANCE
            if away and sample.actual == tracked.last_actual:
                tracked.stuck += 1
            else:
                tracked.stuck = 0
            tracked.last_actual = sample.actual
            self._rates(tracked, sample)
            stats, note = sample.stats, None
            limit = STALE_INTERVALS * max(interval, 1.0) + STALE_SLACK
            if sample.stats_time is None:
                stats, note = None, "never reported yet"
            elif now_wall - sample.stats_time > limit:
                stats, note = None, f"last update {now_wall - sample.stats_time:.0f} s ago, stale after {limit:.0f} s"
            elif stats is None:
                note = "total or available memory not reported"
            if note is not None and note != "total or available memory not reported":
                self._repoll(path, tracked)
            vm_config = self.config.for_vm(tracked.link.name)
            observations.append(VmObservation(
                tracked.link.name, Limits(vm_config.floor, vm_config.ceiling, vm_config.priority), sample.boot_ram,
                sample.actual, stats, sample.vmem, tracked.rates[0], tracked.rates[1], sample.guest_psi,
                sample.host_bytes, tracked.stuck, note,
            ))  # fmt: skip
        now = self.clock()
        swapped = self.host.swap_out_bytes()
        then, before = self._swap
        swap_rate = 0.0
        if swapped is not None and before is not None and now > then:
            swap_rate = max(0.0, (swapped - before) / (now - then))
        self._swap = (now, swapped)
        host_obs = HostObservation(self.budget, self.host.mem_available(), self.host.psi_some_avg10(), swap_rate)
        return host_obs, observations

    def _repoll(self, path: str, tracked: Tracked) -> None:
        """Statistics never came or went stale: a guest that rebooted (memvisor restarts it on the same socket)
        or someone else turned polling off. Ask for polling again (a no-op when it is on)."""
        try:
            if tracked.link.set_polling(self.config.interval):
                log.info("%s: stats polling was off (guest rebooted?): turned it back on", tracked.link.name)
        except MemvisorError as err:
            log.info("%s: cannot turn stats polling back on: %s", tracked.link.name, err)

    @staticmethod
    def _rates(tracked: Tracked, sample: Sample) -> None:
        if sample.stats_time is None:
            return
        previous = tracked.counters
        tracked.counters = (sample.stats_time, sample.major_faults, sample.swap_in)
        if previous is None or sample.stats_time <= previous[0]:
            return
        dt = sample.stats_time - previous[0]

        def rate(new: int | None, old: int | None) -> float:
            return max(0.0, (new - old) / dt) if new is not None and old is not None else 0.0

        tracked.rates = (rate(sample.major_faults, previous[1]), rate(sample.swap_in, previous[2]))

    def act(self, decision: Decision) -> None:
        by_name = {tracked.link.name: (path, tracked) for path, tracked in self.vms.items()}
        for action in decision.actions:
            path, tracked = by_name[action.name]
            try:
                if action.vmem_requested is not None and action.vmem_requested != tracked.requested:
                    vmem = tracked.sample.vmem if tracked.sample else None
                    if vmem is not None and action.vmem_requested != vmem.requested:
                        tracked.link.set_requested_size(vmem.id, action.vmem_requested)
                        log.info("%s: virtio-mem %s requested-size %dM (%s)", action.name, vmem.id,
                                 action.vmem_requested >> 20, action.reason)  # fmt: skip
                    tracked.requested = action.vmem_requested
                if action.balloon != tracked.target:
                    tracked.link.set_balloon(action.balloon)
                    tracked.target = action.balloon
                self._log_decision(tracked, action.name, action.balloon, action.reason)
            except MemvisorError as err:
                self._leave(path, str(err))
            except Exception as err:  # noqa: BLE001 (as in observe)
                self._leave(path, f"unexpected reply ({type(err).__name__}: {err})")

    @staticmethod
    def _log_decision(tracked: Tracked, name: str, target: int, reason: str) -> None:
        """A text line when the target moves by a MiB or more, or the kind of reason changes (numbers aside)."""
        kind = re.sub(r"\d+(\.\d+)?", "#", reason)
        before = tracked.logged
        if before is not None and before[1] == kind and before[0] is not None and abs(target - before[0]) < MiB:
            return
        actual = tracked.sample.actual >> 20 if tracked.sample else "?"
        if before is None or before[0] != target:
            log.info("%s: balloon target %sM -> %dM, actual %sM (%s)", name,
                     "-" if before is None or before[0] is None else before[0] >> 20, target >> 20, actual, reason)  # fmt: skip
        else:
            log.info("%s: target stays %dM, actual %sM (%s)", name, target >> 20, actual, reason)
        tracked.logged = (target, kind)

    def round(self) -> Decision:
        if self._reload_requested and self._reload is not None:
            self._reload_requested = False
            try:
                self.config = self._reload()
                log.info("config reloaded")
            except MemvisorError as err:
                log.error("config not reloaded, keeping the old one: %s", err)
        started = self.clock()
        self.discover()
        host_obs, observations = self.observe()
        policy = POLICIES[self.config.policy]
        decision = policy(host_obs, observations, self.config.knobs)
        for event in decision.events:
            level = logging.WARNING if event.kind in ("floors-exceed-budget", "balloon-stuck") else logging.INFO
            log.log(level, "event %s%s: %s", event.kind, f" {event.vm}" if event.vm else "", event.message)
        self.act(decision)
        took = self.clock() - started
        if took > self.config.interval:
            slow = ", ".join(f"{t.link.name} {t.sample_seconds:.1f} s" for t in self.vms.values())
            log.warning("round took %.1f s, longer than the interval (%g s); reading the VMs took: %s", took,
                        self.config.interval, slow or "-")  # fmt: skip
        self._record(host_obs, observations, decision, took)
        return decision

    def _record(self, host_obs: HostObservation, observations: list[VmObservation], decision: Decision,
                took: float = 0.0) -> None:  # fmt: skip
        held = [o.host_bytes for o in observations if o.host_bytes is not None]
        record = RoundRecord(self.wall(), decision.budget, sum(held) if held else None, host_obs.mem_available,
                             took=round(took, 3))  # fmt: skip
        seconds = {t.link.name: round(t.sample_seconds, 3) for t in self.vms.values()}
        for obs in observations:
            action = decision.action(obs.name)
            record.vms[obs.name] = {
                "actual": obs.actual, "size": obs.size, "target": action.balloon, "plan": action.size,
                "vmem-requested": action.vmem_requested, "host": obs.host_bytes, "stuck": obs.stuck,
                "guest-total": obs.stats.total if obs.stats else None,
                "guest-available": obs.stats.available if obs.stats else None,
                "guest-psi": obs.guest_psi, "major-faults-per-s": obs.major_faults_per_s,
                "floor": obs.floor, "ceiling": obs.ceiling, "reason": action.reason,
                "sample-seconds": seconds.get(obs.name),
            }  # fmt: skip
        record.events = [asdict(event) for event in decision.events]
        self.history.append(record)
        if self.decision_log is not None:
            self.decision_log.write(json.dumps(asdict(record)) + "\n")
            self.decision_log.flush()
        for listener in self.listeners:
            listener(record, decision)

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self, rounds: int | None = None) -> None:
        done = 0
        failed: str | None = None
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.round()
                failed = None
            except Exception as err:  # a bug must not stop the manager silently: say it (once), go on next round
                if f"{type(err).__name__}: {err}" != failed:
                    log.exception("round failed, trying again next interval")
                    failed = f"{type(err).__name__}: {err}"
            done += 1
            if rounds is not None and done >= rounds:
                return
            remaining = self.config.interval - (self.clock() - started)
            woke = wait(self.trigger, self._wake_r, remaining)
            if woke == "psi":
                log.info("host memory pressure crossed the PSI trigger: deciding now")
