"""Issue 10's scenario: three 1G memvisor guests on a 2G host budget, with and without the overcommit manager.

Run inside the lab (as root: it mounts cgroup2 if needed, loads zram, turns swap on, and puts all of it back):
    .venv/bin/memvisor lab --memory 6G --share /tmp/oc -- env PYTHONUNBUFFERED=1 \\
        .venv/bin/python benchmarks/overcommit_scenario.py --out /tmp/oc/overcommit.md
    ... --quick --modes reporting,memvisor      a smoke run: shorter phases, smaller sizes and budget

The lab is the host. The three guests (a, b, c; 1 vCPU, virtio-balloon; free page reporting in every mode but
the first) run under one cgroup v2 whose memory.max is the budget, made fresh for each mode; swap is a zram
device set up here, so that overcommit shows up as host swapping, not only as reclaim or OOM. Phases, the same in
every mode: a fills a tmpfs with 700M (a random 4M block repeated: zram cannot compress it), keeps it a minute
and deletes it; then b does; then c reads a 600M file once (a read-only virtio-pmem device backed by a file the
benchmark wrote beforehand, outside the cgroup; read as a block device, so its page cache grows); then a and b
hold at once. An idle gap follows each phase. The modes:
  none       no manager, no free page reporting
  reporting  free page reporting only
  mom        reporting + `memvisor manager --policy mom` (oVirt MoM's balloon rules)
  memvisor   reporting + `memvisor manager` (the default policy)
  unconstrained  reporting, no memory.max: the baseline for the workloads' slowdown (only when named)
The manager gets the budget less what the memvisor processes hold besides guest RAM (measured after boot, plus
64M), since it counts guest memory only.

Measured over each run, from boot finished to the last gap: host pages swapped out (/proc/vmstat pswpout), the
time the VMs' memory (memory.current + memory.swap.current) was over the budget, the time memory.current was
pressed against memory.max, memory.events "max", guest OOM kills (dmesg through the agent, and the console),
each workload's filling or reading time (timed in the guest), and memory.current on average and at its peak
(sampled every 0.5 s). Output: the markdown table (stdout and --out), a PNG (--plot, default next to --out: the
VMs' memory against the budget over time, a panel per mode, phases marked), and for the manager runs the
manager's own --plot and decision log next to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.overcommit_parts import (  # noqa: E402
    DEFAULT_MODES,
    FULL,
    GUESTS,
    MODES,
    QUICK,
    SEED,
    WORK_DIR,
    Mode,
    ModeResult,
    Phase,
    Sample,
    Scenario,
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
from memvisor.manager.host import parse_flat_keyed  # noqa: E402
from memvisor.memory.libc import LIBC  # noqa: E402
from tests.guest.manager_run import running_manager  # noqa: E402
from tests.guest.vm import GuestVM  # noqa: E402

MiB = 1 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup")
ZRAM = Path("/sys/block/zram0")
ZRAM_DEVICE = "/dev/zram0"
SAMPLE_INTERVAL = 0.5
MANAGER_INTERVAL = 2
MANAGER_MARGIN = 64 * MiB
# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl): no Python wrapper for these
SYS_DELETE_MODULE = 176
SYS_FINIT_MODULE = 313


def log(message: str) -> None:
    print(f"[overcommit {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class SetupError(RuntimeError):
    """The host could not be prepared (cgroup v2, zram swap): the message names what to do."""


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        raise SetupError(f"cannot write {text!r} to {path}: {err.strerror}") from None


def _run(*argv: str) -> None:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SetupError(f"{' '.join(argv)}: {err}") from None
    if result.returncode != 0:
        raise SetupError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")


# --- the host: cgroup v2 with the memory controller, swap on zram ------------------------------------------------------


@contextlib.contextmanager
def cgroup2_with_memory() -> Iterator[None]:
    """cgroup v2 at /sys/fs/cgroup with the memory controller enabled for children; undone on the way out."""
    mounted = False
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        _run("mount", "-t", "cgroup2", "cgroup2", str(CGROUP_ROOT))
        mounted = True
    try:
        if "memory" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
            raise SetupError(f"{CGROUP_ROOT} has no memory controller (is it bound to a cgroup v1 hierarchy?)")
        enabled = "memory" in (CGROUP_ROOT / "cgroup.subtree_control").read_text().split()
        if not enabled:
            _write(CGROUP_ROOT / "cgroup.subtree_control", "+memory")
        try:
            yield
        finally:
            if not enabled:
                with contextlib.suppress(SetupError):
                    _write(CGROUP_ROOT / "cgroup.subtree_control", "-memory")
    finally:
        if mounted:
            subprocess.run(["umount", str(CGROUP_ROOT)], capture_output=True, check=False)


@contextlib.contextmanager
def budget_cgroup(name: str, budget: int | None) -> Iterator[Path]:
    """A fresh child cgroup with memory.max = `budget` (None: no limit; its memory.events start at 0); removed
    afterwards."""
    path = CGROUP_ROOT / name
    if path.exists():
        try:
            path.rmdir()
        except OSError as err:
            raise SetupError(f"the cgroup {path} exists and cannot be removed ({err.strerror}): "
                             "stop what runs in it") from None  # fmt: skip
    path.mkdir()
    try:
        _write(path / "memory.max", "max" if budget is None else str(budget))
        yield path
    finally:
        deadline = time.monotonic() + 30
        while True:
            try:
                path.rmdir()
                break
            except OSError as err:  # EBUSY while the last memvisor exits
                if time.monotonic() > deadline:
                    log(f"left the cgroup {path} behind: {err.strerror}")
                    break
                time.sleep(0.5)


def _zram_modules() -> list[Path]:
    """zram and what it needs (zsmalloc), from the kernel package memvisor's image cache unpacked: the lab's
    initramfs carries only the modules it needs itself, and the host root it chroots into has no /lib/modules."""
    from memvisor.guest.modules import ModuleSet
    from memvisor.guest.packages import cache_dir

    release = platform.release()
    found = sorted((cache_dir() / "packages").glob(f"linux-image-{release}_*/lib/modules/{release}"))
    if not found:
        raise SetupError(f"no zram module: neither modprobe nor the image cache ({cache_dir()}/packages/"
                         f"linux-image-{release}_*) has one; run `memvisor image build` on the host")  # fmt: skip
    moddir = found[-1]
    return [moddir / path for path in ModuleSet(moddir).closure(["zram"])]


def load_zram() -> list[str]:
    """Make /sys/block/zram0 exist; return the modules loaded here (to unload afterwards), in load order."""
    if ZRAM.exists():
        return []
    modprobe = _which("modprobe")
    if modprobe and subprocess.run([modprobe, "zram"], capture_output=True, check=False).returncode == 0:
        return ["zram"]
    if platform.machine() != "x86_64":
        raise SetupError("zram is not loaded and loading it by hand is done for x86_64 only: modprobe zram first")
    loaded = []
    for path in _zram_modules():
        name = path.name.removesuffix(".ko").replace("-", "_")
        if (Path("/sys/module") / name).exists():
            continue
        if path.suffix != ".ko":
            raise SetupError(f"{path} is compressed: modprobe zram by hand first")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if LIBC.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
                raise SetupError(f"finit_module({path}): {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        loaded.append(name)
    if not ZRAM.exists():
        raise SetupError("zram loaded but /sys/block/zram0 did not appear")
    return loaded


def _which(tool: str) -> str | None:
    """`tool` on PATH or in the sbin folders (a root tool, and PATH may lack them)."""
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@contextlib.contextmanager
def zram_swap(size: int) -> Iterator[None]:
    """Swap on /dev/zram0 (`size` of disk), priority 100; swapoff, reset and module unload on the way out."""
    loaded = load_zram()
    try:
        if (ZRAM / "disksize").read_text().strip() != "0":
            raise SetupError(f"{ZRAM_DEVICE} is in use already (disksize {(ZRAM / 'disksize').read_text().strip()}):"
                             f" swapoff {ZRAM_DEVICE} and echo 1 > {ZRAM}/reset first")  # fmt: skip
        _write(ZRAM / "disksize", str(size))
        try:
            _run("mkswap", ZRAM_DEVICE)
            _run("swapon", "-p", "100", ZRAM_DEVICE)
            try:
                yield
            finally:
                with contextlib.suppress(SetupError):
                    _run("swapoff", ZRAM_DEVICE)
        finally:
            with contextlib.suppress(SetupError):
                _write(ZRAM / "reset", "1")
    finally:
        for name in reversed(loaded):
            if LIBC.syscall(SYS_DELETE_MODULE, name.encode(), os.O_NONBLOCK) != 0:
                log(f"could not unload {name}: {os.strerror(ctypes.get_errno())}")


def write_read_file(path: Path, size: int) -> None:
    """The file guest c reads: a random block repeated (written here, outside the VMs' cgroup, so its page cache
    is not charged to them)."""
    block = os.urandom(SEED)
    with path.open("wb") as file:
        for _ in range(size // SEED):
            file.write(block)


# --- sampling the cgroup -------------------------------------------------------------------------------------------


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


class Sampler:
    """memory.current and memory.swap.current of a cgroup every SAMPLE_INTERVAL seconds, on a thread."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def sample(self) -> Sample:
        return Sample(time.monotonic(), _read_int(self.cgroup / "memory.current"),
                      _read_int(self.cgroup / "memory.swap.current"))  # fmt: skip

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(SAMPLE_INTERVAL):
                self.samples.append(self.sample())
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- guests, workloads, the manager -------------------------------------------------------------------------------


def boot_guests(workdir: Path, mode: Mode, scenario: Scenario, cgroup: Path, read_file: Path) -> dict[str, GuestVM]:
    """The three guests, booted side by side (each in its own thread), every memvisor in `cgroup`."""
    balloon = "virtio-balloon,id=balloon0" + (",free-page-reporting=on" if mode.reporting else "")
    guests: dict[str, GuestVM] = {}
    errors: dict[str, BaseException] = {}

    def boot(name: str) -> None:
        devices = [balloon]
        if name == "c":
            devices.append(f"virtio-pmem,id=pm0,file={read_file},readonly=on")
        folder = workdir / name
        folder.mkdir(parents=True)
        try:
            guests[name] = GuestVM(folder, memory=f"{scenario.guest_memory >> 20}M", devices=devices, cgroup=cgroup,
                                   boot_timeout=420)  # fmt: skip
        except BaseException as err:  # noqa: BLE001 (reported below, for every guest)
            errors[name] = err

    threads = [threading.Thread(target=boot, args=(name,), name=f"boot-{name}") for name in GUESTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for vm in guests.values():
            vm.close()
        name, error = next(iter(errors.items()))
        raise RuntimeError(f"guest {name} did not boot: {str(error)[:600]}")
    return guests


def close_guests(guests: dict[str, GuestVM]) -> None:
    threads = [threading.Thread(target=vm.close, name=f"close-{name}") for name, vm in guests.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_phase(guests: dict[str, GuestVM], phase: Phase, index: int, scenario: Scenario,
              timeout: float) -> dict[str, WorkloadResult | None]:  # fmt: skip
    """Start the phase's workloads in their guests (detached), then poll their status files; by guest name."""
    statuses = {}
    for workload in phase.workloads:
        status = f"/tmp/wl{index}-{workload.guest}.status"
        if workload.kind == "hold":
            script = hold_script(workload.size, scenario.hold_seconds, status)
        else:
            script = read_script(status)
        guests[workload.guest].check(f"rm -f {status} && {background(script)}", timeout=60)
        statuses[workload.guest] = status
    results: dict[str, WorkloadResult | None] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(statuses):
        for guest, status in statuses.items():
            if guest in results:
                continue
            try:
                text = guests[guest].exec(f"cat {status} 2>/dev/null", timeout=30).stdout
            except Exception as err:  # noqa: BLE001 (the agent may be slow or gone under pressure: keep polling)
                text = ""
                log(f"  {guest}: polling its status failed: {str(err)[:200]}")
            parsed = parse_status(text)
            if parsed is not None:
                results[guest] = parsed
        if len(results) == len(statuses):
            break
        if time.monotonic() > deadline:
            for guest in statuses:
                if guest not in results:
                    log(f"  {guest}: its workload did not finish within {timeout:.0f} s")
                    results[guest] = None
            break
        time.sleep(2)
    return results


def describe(result: WorkloadResult | None) -> str:
    if result is None:
        return "did not finish"
    return f"exit {result.status}, worked {result.work_seconds:.1f} s, done after {result.total_seconds:.1f} s"


def guest_oom_kills(vm: GuestVM) -> int | None:
    """OOM kills the guest logged: its dmesg through the agent, or its console (which also spans a restart)."""
    counts = []
    with contextlib.suppress(Exception):
        counts.append(count_oom_kills(vm.exec("dmesg", timeout=30).stdout))
    console = vm.console_text()
    if console:
        counts.append(count_oom_kills(console))
    return max(counts) if counts else None


def guest_boots(vm: GuestVM) -> int:
    return vm.console_text().count("Linux version")


# --- one mode ---------------------------------------------------------------------------------------------------------


def _events(cgroup: Path) -> dict[str, int]:
    try:
        return parse_flat_keyed((cgroup / "memory.events").read_text())
    except OSError:
        return {}


def _vmstat() -> dict[str, int]:
    return parse_flat_keyed(Path("/proc/vmstat").read_text())


@dataclasses.dataclass
class Trace:
    """What the plot shows of one mode: the samples and when each phase started."""

    mode: Mode
    samples: list[Sample]
    marks: list[tuple[float, str]]


def run_mode(mode: Mode, scenario: Scenario, workdir: Path, read_file: Path, out: Path) -> tuple[ModeResult, Trace]:
    phases = phase_schedule(scenario)
    columns = iter(workload_columns(phases))
    result = ModeResult(mode)
    trace = Trace(mode, [], [])
    with budget_cgroup(f"memvisor-overcommit-{mode.name}", scenario.budget if mode.limited else None) as cgroup:
        started = time.monotonic()
        stem = out.with_suffix("")
        guests = boot_guests(workdir / mode.name, mode, scenario, cgroup, read_file)
        try:
            for name in ("a", "b"):
                guests[name].check(f"mkdir -p {WORK_DIR} && mount -t tmpfs -o size=100% tmpfs {WORK_DIR}")
            current = _read_int(cgroup / "memory.current")
            guest_ram = sum(vm.host_memory() for vm in guests.values())
            log(f"{mode.name}: three guests booted in {time.monotonic() - started:.0f} s; the cgroup holds "
                f"{current >> 20}M, of it guest RAM {guest_ram >> 20}M")
            if mode.policy is not None:
                result.manager_budget = scenario.budget - max(0, current - guest_ram) - MANAGER_MARGIN
            decisions = Path(f"{stem}-{mode.name}-decisions.jsonl")
            decisions.unlink(missing_ok=True)  # the manager appends
            manager = (
                # outside the cgroup: the manager is the host's; SIGTERM on the way out makes it write its plot
                running_manager([vm.socket for vm in guests.values()], result.manager_budget or 0, decisions,
                                Path(f"{stem}-{mode.name}-manager.log"), interval=MANAGER_INTERVAL,
                                extra=["--policy", mode.policy, "--plot", f"{stem}-{mode.name}-manager.png"],
                                stop_timeout=60)
                if mode.policy is not None else contextlib.nullcontext()
            )  # fmt: skip
            vmstat_before, events_before = _vmstat(), _events(cgroup)
            with Sampler(cgroup) as sampler, manager as proc:
                if proc is not None:
                    log(f"{mode.name}: manager started, --policy {mode.policy} --budget "
                        f"{(result.manager_budget or 0) >> 20}M")  # fmt: skip
                time.sleep(scenario.settle_seconds)
                for index, phase in enumerate(phases):
                    trace.marks.append((time.monotonic(), phase.name))
                    log(f"{mode.name}: phase {phase.name!r}; the cgroup holds "
                        f"{_read_int(cgroup / 'memory.current') >> 20}M + swap "
                        f"{_read_int(cgroup / 'memory.swap.current') >> 20}M")  # fmt: skip
                    timeout = scenario.hold_seconds + (240 if scenario.hold < 512 * MiB else 600)
                    done = run_phase(guests, phase, index, scenario, timeout)
                    for workload in phase.workloads:
                        key = next(columns)
                        result.workloads[key] = done.get(workload.guest)
                        log(f"{mode.name}:   {key}: {describe(done.get(workload.guest))}")
                    time.sleep(phase.gap_seconds)
                if proc is not None and proc.poll() is not None:
                    log(f"{mode.name}: the manager exited early ({proc.returncode}); see {stem}-{mode.name}-manager.log")
            trace.samples = sampler.samples
            vmstat_after, events_after = _vmstat(), _events(cgroup)
            result.pswpout = counter_delta(vmstat_before, vmstat_after, "pswpout")
            result.max_events = counter_delta(events_before, events_after, "max")
            result.cgroup_oom_kills = counter_delta(events_before, events_after, "oom_kill")
            result.over_budget = over_budget_seconds(sampler.samples, scenario.budget)
            result.at_limit = at_limit_seconds(sampler.samples, scenario.budget)
            result.average_held = average_held(sampler.samples)
            result.peak_held = max((s.current for s in sampler.samples), default=0)
            kills = [guest_oom_kills(vm) for vm in guests.values()]
            result.guest_oom_kills = None if None in kills else sum(k or 0 for k in kills)
            restarts = {name: guest_boots(vm) - 1 for name, vm in guests.items() if guest_boots(vm) > 1}
            if restarts:
                log(f"{mode.name}: guests restarted during the run (a reset): {restarts}")
            log(f"{mode.name}: pswpout {result.pswpout}, over budget {result.over_budget} s, at memory.max "
                f"{result.at_limit} s, memory.events max +{result.max_events} oom_kill +{result.cgroup_oom_kills}, "
                f"guest OOM kills {result.guest_oom_kills}, held on average {result.average_held >> 20}M "
                f"(peak {result.peak_held >> 20}M)")  # fmt: skip
        finally:
            close_guests(guests)
            for name, vm in guests.items():  # kept next to --out: what a failed or odd run needs looked at
                with contextlib.suppress(OSError):
                    Path(f"{stem}-{mode.name}-{name}.console").write_text(vm.console_text())
    return result, trace


# --- the plot ---------------------------------------------------------------------------------------------------------


def plot(traces: Sequence[Trace], budget: int, path: Path) -> None:
    """A panel per mode: memory.current and memory.current + memory.swap.current against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 2.8 * len(traces) + 0.5), sharex=True, squeeze=False)
    for axis, trace in zip(axes[:, 0], traces, strict=True):
        if not trace.samples:
            axis.set_title(f"{trace.mode.label}: no samples")
            continue
        t0 = trace.samples[0].time
        times = [s.time - t0 for s in trace.samples]
        axis.plot(times, [(s.current + s.swap) / MiB for s in trace.samples], label="in RAM + in swap")
        axis.plot(times, [s.current / MiB for s in trace.samples], label="in RAM (memory.current)")
        axis.axhline(budget / MiB, color="k", linestyle="--", label="budget (memory.max)")
        for when, name in trace.marks:
            axis.axvline(when - t0, color="grey", linestyle=":")
            axis.annotate(name, (when - t0, budget / MiB), fontsize="small", rotation=90, va="top")
        axis.set_title(trace.mode.label)
        axis.set_ylabel("MiB")
        axis.legend(loc="lower right", fontsize="small")
    axes[-1, 0].set_xlabel("seconds since the guests booted")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, help="the PNG (default: --out with .png)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: shorter phases, smaller sizes and budget")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help=f"modes in order, of {','.join(MODES)} (default {DEFAULT_MODES})")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.mode_list = parse_modes(args.modes)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = QUICK if args.quick else FULL
    if os.geteuid() != 0:
        log("this needs root (cgroup v2, zram, swapon): run it inside the lab, which runs as root")
        return 2
    out: Path = args.out
    plot_path: Path = args.plot or out.with_suffix(".png")
    log(f"modes {','.join(m.name for m in args.mode_list)}; budget {scenario.budget >> 20}M; fixed time per mode "
        f"{schedule_seconds(scenario):.0f} s plus boots and workloads")  # fmt: skip
    results: list[ModeResult] = []
    traces: list[Trace] = []
    with tempfile.TemporaryDirectory(prefix="overcommit-") as tmp:
        workdir = Path(tmp)
        read_file = workdir / "read.img"
        write_read_file(read_file, scenario.read)
        try:
            with cgroup2_with_memory(), zram_swap(scenario.zram):
                log(f"swap on {ZRAM_DEVICE} ({scenario.zram >> 20}M of zram)")
                for mode in args.mode_list:
                    try:
                        result, trace = run_mode(mode, scenario, workdir, read_file, out)
                    except Exception as err:  # noqa: BLE001 (a failed mode is a row; the next one runs)
                        log(f"{mode.name}: failed: {err}")
                        result, trace = ModeResult(mode, error=str(err).splitlines()[0][:200]), Trace(mode, [], [])
                    results.append(result)
                    traces.append(trace)
                    table = render_table(results, phase_schedule(scenario), scenario)
                    log(f"so far:\n{table}")
                    out.write_text(table)  # a lab that times out later still leaves the rows done
                    plot(traces, scenario.budget, plot_path)  # and the plot of them
        except SetupError as err:
            log(f"cannot prepare the host: {err}")
            return 2
    table = render_table(results, phase_schedule(scenario), scenario)
    print(table, flush=True)
    log(f"wrote {out} and {plot_path}")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
