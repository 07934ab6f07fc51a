"""QMP `migrate` to a file and `query-migrate` (QEMU's names and shapes; memvisor saves only to `file:PATH`).

The machine side is optional in MachineControl: a machine without `migrate` (the fake) answers with QEMU's
CommandNotFound-like GenericError.
"""

from __future__ import annotations

from typing import Any

from memvisor.control.args import Arg, Kind
from memvisor.control.commands import Context, command
from memvisor.control.errors import QmpError


def _machine_method(ctx: Context, name: str) -> Any:
    method = getattr(ctx.machine, name, None)
    if method is None:
        raise QmpError("this machine cannot be migrated or snapshotted")
    return method


@command(
    "migrate",
    Arg("uri", Kind.STR),
    Arg("blk", Kind.BOOL, required=False),
    Arg("inc", Kind.BOOL, required=False),
    Arg("detach", Kind.BOOL, required=False),
    Arg("resume", Kind.BOOL, required=False),
)
def migrate(ctx: Context, args: dict[str, Any]) -> Any:
    if args.get("blk") or args.get("inc"):
        raise QmpError("block migration is not supported: memvisor guests have no disks to copy")
    _machine_method(ctx, "migrate")(args["uri"])
    return {}


@command("query-migrate")
def query_migrate(ctx: Context, args: dict[str, Any]) -> Any:
    info = getattr(ctx.machine, "migration_info", None)
    return info() if info is not None else {}


@command("migrate-incoming", Arg("uri", Kind.STR))
def migrate_incoming(ctx: Context, args: dict[str, Any]) -> Any:
    _machine_method(ctx, "migrate_incoming")(args["uri"])
    return {}
