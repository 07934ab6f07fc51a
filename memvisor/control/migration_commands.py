"""QMP `migrate` to a file and `query-migrate` (QEMU's names and shapes): `file:PATH` snapshots and live migration
over `tcp:`/`unix:` (memvisor/migration/), with migrate_cancel, the parameters and capabilities.

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


# --- live migration (memvisor/migration/job.py) --------------------------------------------------------------


def _live_job(ctx: Context) -> Any:
    return _machine_method(ctx, "live_job")()


@command("migrate_cancel")
def migrate_cancel(ctx: Context, args: dict[str, Any]) -> Any:
    _machine_method(ctx, "migrate_cancel")()
    return {}


@command(
    "migrate-set-parameters",
    Arg("downtime-limit", Kind.UINT, required=False),
    Arg("max-bandwidth", Kind.UINT, required=False),
    Arg("x-max-passes", Kind.UINT, required=False),
)
def migrate_set_parameters(ctx: Context, args: dict[str, Any]) -> Any:
    _live_job(ctx).set_parameters(args)
    return {}


@command("query-migrate-parameters")
def query_migrate_parameters(ctx: Context, args: dict[str, Any]) -> Any:
    return _live_job(ctx).parameters()


@command("migrate-set-capabilities", Arg("capabilities", Kind.ARRAY))
def migrate_set_capabilities(ctx: Context, args: dict[str, Any]) -> Any:
    items = args["capabilities"]
    if not all(isinstance(item, dict) for item in items):
        raise QmpError("Invalid parameter type for 'capabilities[0]', expected: object")
    _live_job(ctx).set_capabilities(items)
    return {}


@command("query-migrate-capabilities")
def query_migrate_capabilities(ctx: Context, args: dict[str, Any]) -> Any:
    return _live_job(ctx).capability_list()
