"""The QMP commands memvisor answers: QEMU 7.2's names, arguments, reply shapes and error texts.

Each command is a plain synchronous function `handler(ctx, args) -> reply` registered with its argument
declaration; the server checks the arguments (memvisor/control/args.py) and runs the handler in a worker
thread, so a handler may block on the machine. A handler fails by raising QmpError (or the machine's
MachineError, which the server turns into the same form).

A command can also have `after_reply`, run once the reply is on its way: `quit` answers first and then shuts the
machine down, as QEMU does, so the client sees `{"return": {}}` before SHUTDOWN.

memvisor's own commands carry QEMU's `x-` prefix for experimental commands.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memvisor.control import hmp, qom
from memvisor.control.args import Arg, Kind, check_args
from memvisor.control.errors import DEVICE_NOT_ACTIVE, QmpError
from memvisor.control.machine_api import (
    BalloonControl,
    EventSink,
    HintStatus,
    MachineControl,
    RunState,
    VirtioMemInfo,
    VirtioPmemInfo,
)

QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
PACKAGE = "memvisor 0.1.0"
EXEC_DEFAULT_TIMEOUT = 30.0
EXEC_MAX_TIMEOUT = 24 * 3600.0


@dataclass
class Context:
    """What a handler works with: the machine and the event sink (for events the QMP layer itself raises)."""

    machine: MachineControl
    emit: EventSink


Handler = Callable[[Context, dict[str, Any]], Any]


@dataclass(frozen=True)
class Command:
    """A QMP command: name, declared arguments, handler, and an optional action after the reply is sent."""

    name: str
    args: tuple[Arg, ...]
    handler: Handler
    after_reply: Callable[[Context], None] | None = None


REGISTRY: dict[str, Command] = {}


def command(
    name: str, *args: Arg, after_reply: Callable[[Context], None] | None = None
) -> Callable[[Handler], Handler]:
    """Register `handler` as QMP command `name` taking `args`."""

    def register(handler: Handler) -> Handler:
        REGISTRY[name] = Command(name, tuple(args), handler, after_reply)
        return handler

    return register


def execute(ctx: Context, name: str, arguments: dict[str, Any]) -> Any:
    """Run command `name` with `arguments` (checked here); the reply value, or QmpError.

    `qmp_capabilities` is the server's business (it depends on the connection) and is not in the registry.
    """
    cmd = REGISTRY.get(name)
    if cmd is None:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")
    return cmd.handler(ctx, check_args(cmd.args, arguments))


# --- general -------------------------------------------------------------------------------------------------


@command("query-version")
def query_version(ctx: Context, args: dict[str, Any]) -> Any:
    return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}


@command("query-commands")
def query_commands(ctx: Context, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in ["qmp_capabilities", *REGISTRY]]


@command("query-status")
def query_status(ctx: Context, args: dict[str, Any]) -> Any:
    state = ctx.machine.run_state()
    return {"running": state is RunState.RUNNING, "singlestep": False, "status": str(state)}


@command("stop")
def stop(ctx: Context, args: dict[str, Any]) -> Any:
    ctx.machine.stop()
    return {}


@command("cont")
def cont(ctx: Context, args: dict[str, Any]) -> Any:
    ctx.machine.cont()
    return {}


@command("system_powerdown")
def system_powerdown(ctx: Context, args: dict[str, Any]) -> Any:
    ctx.machine.powerdown()
    return {}


@command("system_reset")
def system_reset(ctx: Context, args: dict[str, Any]) -> Any:
    ctx.machine.reset()
    return {}


@command("quit", after_reply=lambda ctx: ctx.machine.quit())
def quit_(ctx: Context, args: dict[str, Any]) -> Any:
    return {}


@command("query-cpus-fast")
def query_cpus_fast(ctx: Context, args: dict[str, Any]) -> Any:
    return [
        {
            "cpu-index": cpu.cpu_index,
            "qom-path": cpu.qom_path or f"/machine/unattached/device[{cpu.cpu_index}]",
            "thread-id": cpu.thread_id,
            "props": dict(cpu.props),
            "target": cpu.target,
        }
        for cpu in ctx.machine.vcpus()
    ]


@command("human-monitor-command", Arg("command-line", Kind.STR), Arg("cpu-index", Kind.INT, required=False))
def human_monitor_command(ctx: Context, args: dict[str, Any]) -> Any:
    return hmp.run(args["command-line"], lambda name, arguments: execute(ctx, name, arguments))


# --- memory --------------------------------------------------------------------------------------------------


@command("query-memory-size-summary")
def query_memory_size_summary(ctx: Context, args: dict[str, Any]) -> Any:
    plugged = sum(dev.size for dev in ctx.machine.memory_devices())
    return {"base-memory": ctx.machine.boot_memory_bytes(), "plugged-memory": plugged}


@command("query-memory-devices")
def query_memory_devices(ctx: Context, args: dict[str, Any]) -> Any:
    reply: list[dict[str, Any]] = []
    for dev in ctx.machine.memory_devices():
        if isinstance(dev, VirtioMemInfo):
            data: dict[str, Any] = {
                "memaddr": dev.memaddr,
                "node": dev.node,
                "requested-size": dev.requested_size,
                "size": dev.size,
                "max-size": dev.max_size,
                "block-size": dev.block_size,
                "memdev": qom.memdev_path(dev.id),
                "id": dev.id,
            }
            reply.append({"type": "virtio-mem", "data": data})
        elif isinstance(dev, VirtioPmemInfo):
            data = {"memaddr": dev.memaddr, "size": dev.size, "memdev": qom.memdev_path(dev.id), "id": dev.id}
            reply.append({"type": "virtio-pmem", "data": data})
    return reply


def _balloon(ctx: Context) -> BalloonControl:
    balloon = ctx.machine.balloon()
    if balloon is None:
        raise QmpError("No balloon device has been activated", DEVICE_NOT_ACTIVE)
    return balloon


@command("balloon", Arg("value", Kind.INT))
def balloon(ctx: Context, args: dict[str, Any]) -> Any:
    dev = _balloon(ctx)
    target = args["value"]
    if target <= 0:
        raise QmpError("Parameter 'target' expects a size")
    # QEMU clamps a target above boot RAM to boot RAM (virtio_balloon_to_target).
    dev.set_target_bytes(min(target, ctx.machine.boot_memory_bytes()))
    return {}


@command("query-balloon")
def query_balloon(ctx: Context, args: dict[str, Any]) -> Any:
    return {"actual": _balloon(ctx).actual_bytes()}


@command("qom-list", Arg("path", Kind.STR))
def qom_list(ctx: Context, args: dict[str, Any]) -> Any:
    return qom.qom_list(qom.resolve(qom.build_tree(ctx.machine), args["path"]))


@command("qom-get", Arg("path", Kind.STR), Arg("property", Kind.STR))
def qom_get(ctx: Context, args: dict[str, Any]) -> Any:
    return qom.qom_get(qom.resolve(qom.build_tree(ctx.machine), args["path"]), args["property"])


@command("qom-set", Arg("path", Kind.STR), Arg("property", Kind.STR), Arg("value", Kind.ANY))
def qom_set(ctx: Context, args: dict[str, Any]) -> Any:
    qom.qom_set(qom.resolve(qom.build_tree(ctx.machine), args["path"]), args["property"], args["value"])
    return {}


# --- memvisor's own (experimental, x-) ----------------------------------------------------------------------


@command("x-guest-exec", Arg("command", Kind.STR), Arg("timeout", Kind.NUMBER, required=False))
def x_guest_exec(ctx: Context, args: dict[str, Any]) -> Any:
    """Run a shell command in the guest; the reply mirrors QEMU guest agent's guest-exec-status."""
    timeout = float(args.get("timeout", EXEC_DEFAULT_TIMEOUT))
    if not 0 < timeout <= EXEC_MAX_TIMEOUT:
        raise QmpError(f"Parameter 'timeout' must be between 0 and {EXEC_MAX_TIMEOUT:g} seconds")
    if not args["command"].strip():
        raise QmpError("Parameter 'command' must not be empty")
    result = ctx.machine.guest_exec(args["command"], timeout)
    return {
        "exited": True,
        "exitcode": result.exitcode,
        "out-data": base64.b64encode(result.stdout).decode("ascii"),
        "err-data": base64.b64encode(result.stderr).decode("ascii"),
    }


def hint_json(status: HintStatus) -> dict[str, Any]:
    """A hinting cycle as QMP shows it."""
    return {"cmd-id": status.cmd_id, "state": str(status.state), "pages": status.pages, "bytes": status.bytes}


@command("x-balloon-hint-start")
def x_balloon_hint_start(ctx: Context, args: dict[str, Any]) -> Any:
    """Start a free page hinting cycle: KVM dirty logging goes on first, then the guest gets a new command id.

    The guest hints free 4 MiB blocks and holds them; it answers STOP by itself when it has no more (state
    "stopped"). A page's hint is dropped when the guest writes the page after hinting it.
    """
    return hint_json(_balloon(ctx).hint_start())


@command("x-balloon-hint-stop")
def x_balloon_hint_stop(ctx: Context, args: dict[str, Any]) -> Any:
    """End the cycle: the dirty log is applied, then STOP and at once DONE are written (state "done").

    No separate DONE step: the Linux driver acts on the latest command id, and the device ignores hints once
    the cycle left "running", so the guest gets its held blocks back with this command (QEMU writes DONE when
    migration ends). The hinted set stays readable and keeps losing the pages the guest writes.
    """
    return hint_json(_balloon(ctx).hint_stop())


@command("x-query-balloon-hints")
def x_query_balloon_hints(ctx: Context, args: dict[str, Any]) -> Any:
    """Recent cycles, newest last; pages written since the last look leave the hinted set first."""
    return [hint_json(status) for status in _balloon(ctx).hint_status()]


@command("x-query-balloon-hinted-ranges")
def x_query_balloon_hinted_ranges(ctx: Context, args: dict[str, Any]) -> Any:
    """The guest physical ranges still hinted free in the latest cycle, after dropping the pages the guest wrote
    since: exactly what a migration would skip."""
    return [{"start": start, "length": length} for start, length in _balloon(ctx).hinted_ranges()]


@command("x-query-host-memory")
def x_query_host_memory(ctx: Context, args: dict[str, Any]) -> Any:
    """What the host holds for this VM, per region ("ram" and each device id), and the total."""
    held = ctx.machine.host_memory()
    return {
        "total": sum(held.values()),
        "regions": [{"name": name, "allocated": size} for name, size in held.items()],
    }


@command("x-query-exits")
def x_query_exits(ctx: Context, args: dict[str, Any]) -> Any:
    """VM exits that reached Python since the machine started, by kind, and their total (for benchmarks); with
    MEMVISOR_IOEVENTFD=1 also "eventfd": the queue notifies and interrupts that went through eventfds instead."""
    counts = ctx.machine.exit_counts()
    reply: dict[str, Any] = {"total": sum(counts.values()),
                             "kinds": [{"kind": k, "count": n} for k, n in sorted(counts.items())]}  # fmt: skip
    eventfd = ctx.machine.eventfd_counts()
    if eventfd is not None:
        reply["eventfd"] = eventfd
    return reply


@command("x-query-pmem")
def x_query_pmem(ctx: Context, args: dict[str, Any]) -> Any:
    """Each virtio-pmem device with its counters (flush requests, fsyncs done and failed, time spent syncing).

    QEMU keeps no such counters; memvisor shows them so a client can see that the guest's flushes reach the host.
    """
    return [
        {
            "id": dev.id,
            "memaddr": dev.memaddr,
            "size": dev.size,
            "counters": {name.replace("_", "-"): value for name, value in dev.counters.items()},
        }
        for dev in ctx.machine.memory_devices()
        if isinstance(dev, VirtioPmemInfo)
    ]


# Commands in their own modules register themselves on import.
from memvisor.control import migration_commands  # noqa: E402, F401
