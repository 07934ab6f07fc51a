"""The manager's configuration file (TOML), validated into plain values; every mistake is one line naming the fix.

    interval = 5                 # seconds between rounds (a host PSI trigger wakes the manager earlier)
    controller = "memvisor"      # or "mom": oVirt MoM's balloon rules, the baseline
    budget = "2G"                # optional; --budget wins

    [policy]                     # the controller's knobs (memvisor/manager/policy.py Knobs)
    step_percent = 3             # reclaim at most 3 % of a VM's ceiling per interval
    dead_band_percent = 1
    min_headroom = "64M"

    [defaults]                   # every VM unless its own table says otherwise
    floor = "256M"               # never planned below this
    priority = 0                 # higher keeps its memory longer when the budget is short

    [vm.web]                     # a VM by name: its socket's file name without ".sock"
    floor = "512M"
    ceiling = "3G"               # never above (boot RAM + virtio-mem max-size caps it too)
    priority = 10
    cgroup = "/sys/fs/cgroup/machine.slice/web"   # read memory.current there (else found from the VM's pid)
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memvisor.errors import UsageError
from memvisor.manager.policy import POLICIES, Knobs
from memvisor.units import parse_size

MiB = 1 << 20
DEFAULT_INTERVAL = 5.0
DEFAULT_FLOOR = 256 * MiB
UNLIMITED = 1 << 62
_SIZE_KNOBS = {"min_headroom", "cache_keep", "min_available", "host_reserve"}
_INT_KNOBS = {"stuck_intervals"}


@dataclass(frozen=True)
class VmConfig:
    floor: int = DEFAULT_FLOOR
    ceiling: int = UNLIMITED
    priority: int = 0
    cgroup: str | None = None


@dataclass(frozen=True)
class Config:
    interval: float = DEFAULT_INTERVAL
    policy: str = "memvisor"
    budget: int | None = None
    knobs: Knobs = field(default_factory=Knobs)
    defaults: VmConfig = field(default_factory=VmConfig)
    vms: dict[str, VmConfig] = field(default_factory=dict)

    def for_vm(self, name: str) -> VmConfig:
        return self.vms.get(name, self.defaults)


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f'{what} must be a size such as "512M", got {value!r}')
    size = parse_size(value, what)
    return size


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{what} must be a number, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{what} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(allowed))}")


def _vm(table: Any, base: VmConfig, where: str) -> VmConfig:
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table, e.g. [{where}] with floor = \"512M\"")
    _check_keys(table, {"floor", "ceiling", "priority", "cgroup"}, where)
    floor = _size(table["floor"], f"{where}.floor") if "floor" in table else base.floor
    ceiling = _size(table["ceiling"], f"{where}.ceiling") if "ceiling" in table else base.ceiling
    priority = base.priority
    if "priority" in table:
        priority = int(_number(table["priority"], f"{where}.priority", -1000, 1000))
    cgroup = base.cgroup
    if "cgroup" in table:
        if not isinstance(table["cgroup"], str):
            raise UsageError(f'{where}.cgroup must be a path such as "/sys/fs/cgroup/machine.slice/web"')
        cgroup = table["cgroup"]
    if floor < 16 * MiB:
        raise UsageError(f"{where}.floor {floor >> 20}M is too small for a Linux guest: give at least 16M")
    if ceiling < floor:
        raise UsageError(f"{where}: ceiling is below floor; raise the ceiling or lower the floor")
    return VmConfig(floor, ceiling, priority, cgroup)


def _knobs(table: Any, where: str) -> Knobs:
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table of knobs, e.g. step_percent = 3")
    names = {f.name for f in dataclasses.fields(Knobs)}
    _check_keys(table, names, where)
    values: dict[str, Any] = {}
    for name, value in table.items():
        what = f"{where}.{name}"
        if name in _SIZE_KNOBS:
            values[name] = _size(value, what)
        elif name in _INT_KNOBS:
            values[name] = int(_number(value, what, 1, 1000))
        else:
            values[name] = _number(value, what, 0, 100 if name.endswith("percent") or "psi" in name else 1e12)
    return Knobs(**values)


def parse(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a parsed TOML document."""
    _check_keys(data, {"interval", "controller", "policy", "budget", "defaults", "vm"}, source)
    interval = _number(data.get("interval", DEFAULT_INTERVAL), _where(source, "interval"), 0.1, 3600)
    policy = data.get("controller", "memvisor")
    knobs = _knobs(data.get("policy", {}), f"{source}: [policy]")
    if policy not in POLICIES:
        raise UsageError(f"{source}: controller {policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    budget = _size(data["budget"], _where(source, "budget")) if "budget" in data else None
    defaults = _vm(data.get("defaults", {}), VmConfig(), f"{source}: [defaults]")
    vms_table = data.get("vm", {})
    if not isinstance(vms_table, dict):
        raise UsageError(f"{source}: vm must be tables, e.g. [vm.web] with floor = \"512M\"")
    vms = {name: _vm(table, defaults, f"{source}: [vm.{name}]") for name, table in vms_table.items()}
    return Config(interval, policy, budget, knobs, defaults, vms)


def load(path: str | Path) -> Config:
    """Read and validate a TOML file; UsageError with the file's name on any problem."""
    source = str(path)
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no config file {source}: give an existing --config FILE or leave it out") from None
    except OSError as err:
        raise UsageError(f"cannot read config file {source}: {err.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{source} is not UTF-8 text: write the config as TOML") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{source} is not valid TOML ({err}): fix that line") from None
    return parse(data, source)
