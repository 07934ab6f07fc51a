"""`memvisor manager`: the CLI verb that runs the overcommit manager over VMs' QMP sockets."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any

from memvisor.errors import UsageError
from memvisor.manager import config as config_mod
from memvisor.manager.loop import Manager, RoundRecord
from memvisor.manager.policy import POLICIES, Decision
from memvisor.units import parse_size

DESCRIPTION = """\
Keep several VMs inside a host memory budget without host swapping and without guest OOM.

Every interval (and at once when host memory pressure crosses a PSI trigger) the manager reads each VM's
balloon statistics (it turns stats polling on), the host's MemAvailable, memory PSI and swap-out, each VM's
host memory (its cgroup v2 memory.current, memvisor's x-query-host-memory, or its RSS) and, for memvisor
guests, the guest's memory PSI through the agent. Then it decides:
  - floors first: no VM is ever planned below its floor; if the floors alone exceed the budget it says so
    (event floors-exceed-budget) and keeps them rather than squeezing a guest toward OOM;
  - the balloon takes what a guest does not need (used + a little page cache + headroom), at most a few
    percent of the VM per interval, nothing inside a dead band;
  - a guest under pressure (little available memory, major faults, swap-in, memory PSI) gets memory back at
    once, in a large step;
  - when the budget is short, higher priority keeps its memory longer;
  - virtio-mem grows a VM past its boot RAM up to its ceiling, and unplugs for lasting shrinks;
  - a balloon that does not move for three intervals gets its target reset to its actual.
Free page reporting (virtio-balloon,free-page-reporting=on) returns freed guest pages by itself meanwhile.

QEMU 7.2 VMs work too (-device virtio-balloon-pci,id=balloon0 and -qmp unix:SOCK,server=on,wait=off);
their features are detected: no guest PSI, host memory from their cgroup or RSS.
"""

EPILOG = """\
examples:
  memvisor manager --budget 2G /tmp/vm1.sock /tmp/vm2.sock
  memvisor manager --budget 6G --config manager.toml '/run/vms/*.sock'     VMs join and leave as sockets come and go
  memvisor manager --budget 2G --watch --log decisions.jsonl /tmp/vm1.sock
  memvisor manager --budget 2G --policy mom /tmp/vm1.sock                  oVirt MoM's rules, for comparison
  memvisor manager --budget 2G --metrics 127.0.0.1:9101 --plot run.png /tmp/vm1.sock
  kill -HUP PID                                                            reload the config file

config file (TOML), all keys optional:
  interval = 5
  controller = "memvisor"           # or "mom"
  [policy]                          # knobs: step_percent = 3, dead_band_percent = 1, grow_step_percent = 25,
  step_percent = 3                  #   headroom_percent = 10, min_headroom = "64M", cache_keep = "32M",
                                    #   min_available = "48M", major_faults_per_s = 100, guest_psi = 10, ...
  [defaults]
  floor = "256M"
  [vm.vm1]                          # the VM whose socket is .../vm1.sock
  floor = "512M"
  ceiling = "3G"
  priority = 10
  cgroup = "/sys/fs/cgroup/machine.slice/vm1"
See docs/MANAGER.md."""


def add_manager_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "manager", help="keep VMs inside a host memory budget (balloon + virtio-mem), no swapping, no guest OOM",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("sockets", metavar="SOCK", nargs="+",
                        help="a VM's QMP socket, or a quoted glob such as '/run/vms/*.sock'")  # fmt: skip
    parser.add_argument("--budget", metavar="SIZE", help="host memory for all the VMs together, e.g. 2G")
    parser.add_argument("--config", metavar="FILE", help="TOML: floors, ceilings, priorities, knobs (SIGHUP reloads)")
    parser.add_argument("--interval", type=float, metavar="S", help="seconds between rounds (default 5)")
    parser.add_argument("--policy", choices=sorted(POLICIES), help="the controller (default memvisor)")
    parser.add_argument("--rounds", type=int, metavar="N", help="stop after N rounds (default: run until killed)")
    parser.add_argument("--log", metavar="FILE", help="append every decision with its reason as JSON lines")
    parser.add_argument("--watch", action="store_true", help="print a table of the VMs after every round")
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    parser.add_argument("--plot", metavar="FILE", help="on exit, write a PNG: host memory against the budget, each VM")
    parser.add_argument("--quiet", action="store_true", help="log only warnings (events such as floors-exceed-budget)")
    parser.set_defaults(func=run_manager)
    from memvisor.manager.top import add_top_command

    add_top_command(subparsers)  # `memvisor top`, the manager's read-only companion view


def load_config(args: argparse.Namespace) -> config_mod.Config:
    config = config_mod.load(args.config) if args.config else config_mod.Config()
    changes: dict[str, Any] = {}
    if args.interval is not None:
        if not 0.1 <= args.interval <= 3600:
            raise UsageError(f"--interval must be between 0.1 and 3600 seconds, got {args.interval:g}")
        changes["interval"] = args.interval
    if args.policy is not None:
        changes["policy"] = args.policy
    if changes:
        import dataclasses

        config = dataclasses.replace(config, **changes)
    return config


def _budget(args: argparse.Namespace, config: config_mod.Config) -> int:
    if args.budget is not None:
        budget = parse_size(args.budget, "--budget")
    elif config.budget is not None:
        budget = config.budget
    else:
        raise UsageError("no budget: give --budget SIZE (host memory for all the VMs, e.g. 2G) or budget in --config")
    if budget <= 0:
        raise UsageError("--budget must be above 0, e.g. 2G")
    return budget


def watch_table(record: RoundRecord, decision: Decision) -> str:
    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value >> 20}M"

    lines = [f"budget {mib(record.budget)}  VMs on the host {mib(record.host_total)}  "
             f"host MemAvailable {mib(record.mem_available)}  planned {mib(decision.total)}"]  # fmt: skip
    rows = [("vm", "floor", "target", "actual", "guest-used", "guest-avail", "host", "reason")]
    for name, vm in record.vms.items():
        total, avail = vm["guest-total"], vm["guest-available"]
        used = total - avail if total is not None and avail is not None else None
        rows.append((name, mib(vm["floor"]), mib(vm["plan"]), mib(vm["size"]), mib(used), mib(avail), mib(vm["host"]),
                     vm["reason"]))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return "\n".join(lines)


def run_manager(args: argparse.Namespace) -> int:
    config = load_config(args)
    budget = _budget(args, config)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s manager: %(message)s")  # fmt: skip
    decision_log: IO[str] | None = None
    if args.log:
        try:
            decision_log = Path(args.log).open("a")  # noqa: SIM115 (closed in the finally below)
        except OSError as err:
            raise UsageError(f"cannot write the decision log {args.log}: {err.strerror}") from None
    from memvisor.manager.metrics import MetricsServer, plot

    metrics = MetricsServer(args.metrics) if args.metrics else None
    manager = Manager(args.sockets, config, budget, decision_log=decision_log)
    if metrics is not None:
        manager.listeners.append(metrics.update)
        metrics.start()
    if args.watch:
        manager.listeners.append(lambda record, decision: print(watch_table(record, decision) + "\n", flush=True))

    def on_hup(signum: int, frame: FrameType | None) -> None:
        manager.request_reload(lambda: load_config(args))

    def on_term(signum: int, frame: FrameType | None) -> None:
        manager.stop()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGHUP, on_hup), (signal.SIGTERM, on_term))}  # fmt: skip
    try:
        manager.run(args.rounds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        manager.close()
        if decision_log is not None:
            decision_log.close()
        if metrics is not None:
            metrics.stop()
    if args.plot:
        plot(manager.history, args.plot)
    return 0
