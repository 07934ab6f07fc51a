"""Kernel modules for an initramfs: dependency closure from modules.dep, copied into a staging tree.

Debian's kernel packages ship modules but no modules.dep, so the builder runs `depmod -b ROOT RELEASE` from
the pinned busybox-static (a static program, so it runs on any x86-64 host and needs no kmod there) once on
the unpacked package, picks the requested modules plus everything they depend on, copies those into the
staging tree at the same `lib/modules/RELEASE/...` paths, and runs depmod again there, so that busybox
`modprobe` in the guest finds modules.dep and modules.alias (the kernel's own request_module, e.g. for
`crypto-crc32c`, goes through /sbin/modprobe too).

modules.dep format (one line per module): `kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko ...`, paths relative
to `lib/modules/RELEASE`; busybox lists every module a module needs, directly or not.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from memvisor.errors import MemvisorError

_DONE_MARKER = ".memvisor-depmod-done"
_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(relpath: str) -> str:
    """The kernel's name for a module file: basename without `.ko[.xz]`, dashes as underscores."""
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep as {module path: [paths it depends on]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep and path.strip():
            deps[path.strip()] = rest.split()
    return deps


def run_depmod(busybox: Path, root: Path, release: str) -> None:
    """Run busybox `depmod -b root release`, writing modules.dep/.alias/.symbols into the module folder."""
    result = subprocess.run(
        [str(busybox), "depmod", "-b", str(root), release], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise MemvisorError(
            f"depmod failed on {root}/lib/modules/{release} ({result.stderr.strip() or 'no message'}): "
            f"remove that folder from the cache and retry"
        )


def ensure_modules_dep(busybox: Path, root: Path, release: str) -> Path:
    """Make sure the unpacked kernel package `root` has a complete modules.dep; return the module folder."""
    moddir = root / "lib" / "modules" / release
    if not (moddir / _DONE_MARKER).exists():
        run_depmod(busybox, root, release)
        (moddir / _DONE_MARKER).write_text("depmod done\n")
    return moddir


class ModuleSet:
    """The modules of one kernel tree, by name, with their dependencies from modules.dep."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.deps = parse_modules_dep((moddir / "modules.dep").read_text())
        self.by_name = {module_name(path): path for path in self.deps}
        builtin = moddir / "modules.builtin"
        self.builtin = (
            {module_name(line.strip()) for line in builtin.read_text().splitlines() if line.strip()}
            if builtin.exists()
            else set()
        )

    def has(self, name: str) -> bool:
        """Whether `name` exists as a loadable module file."""
        return name.replace("-", "_") in self.by_name

    def closure(self, names: Iterable[str], *, optional: Iterable[str] = ()) -> list[str]:
        """Module paths for `names` and their dependencies, each after everything it needs.

        A required name that is neither a module nor built in is an error; an `optional` name that is
        neither is skipped, as is any built-in one.
        """
        wanted: list[str] = []
        optional_set = {n.replace("-", "_") for n in optional}
        for raw in [*names, *optional]:
            name = raw.replace("-", "_")
            if name in self.by_name:
                wanted.append(self.by_name[name])
            elif name not in self.builtin and name not in optional_set:
                raise MemvisorError(
                    f"kernel module {name} is neither in {self.moddir} nor built in: "
                    "pick another kernel flavour or move the pins with `memvisor image pin`"
                )
        ordered: list[str] = []
        seen: set[str] = set()

        def visit(path: str, depth: int) -> None:
            if path in seen or depth > len(self.deps):
                return
            seen.add(path)
            for dep in self.deps.get(path, []):
                visit(dep, depth + 1)
            ordered.append(path)

        for path in wanted:
            visit(path, 0)
        return ordered

    def loadable_names(self, names: Iterable[str]) -> list[str]:
        """The names among `names` that exist as module files (built-in ones need no modprobe)."""
        return [n.replace("-", "_") for n in names if self.has(n)]


def copy_modules(modules: ModuleSet, paths: Iterable[str], staging: Path, release: str) -> None:
    """Copy module files into `staging/lib/modules/release/` at the same relative paths.

    xz-compressed modules are decompressed on the way, since busybox insmod may not read them; the later
    depmod on the staging tree records the new names. Also copies modules.builtin and modules.order.
    """
    target = staging / "lib" / "modules" / release
    for rel in paths:
        src = modules.moddir / rel
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".ko.xz"):
            dest.with_suffix("").write_bytes(lzma.decompress(src.read_bytes()))
        elif rel.endswith(".ko"):
            shutil.copyfile(src, dest)
        else:
            raise MemvisorError(f"cannot load {rel}: compressed in a way the builder cannot undo")
    for extra in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (modules.moddir / extra).exists():
            shutil.copyfile(modules.moddir / extra, target / extra)
