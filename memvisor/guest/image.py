"""The guest image: a Debian kernel and an initramfs of our making, built from pinned packages and cached.

`ensure_guest_image(flavour)` returns the kernel and initramfs the VMM boots, building them on first use:
 1. fetch the pinned packages (packages.py): the kernel of the flavour, busybox-static, e2fsprogs and the
    libraries its programs load, libc6 included so the guest never depends on the host's libc;
 2. stage a root tree: busybox with its applet links, mkfs.ext4/e2fsck/debugfs/tune2fs with their
    libraries and the dynamic loader, the virtio-mmio, balloon, mem, console and virtio-pmem/nvdimm
    modules with their dependencies (modules.py), /init (init.sh) and the agent (agent.sh);
 3. write it as an uncompressed newc cpio (cpio.py), plus `/dev/console`, which the kernel needs before /init.
The image folder's name carries a hash of everything it is made of (the pins, the module lists, the text of
init.sh and agent.sh, and the builder's own source), so a change to any of them builds a new image; nothing is
rebuilt otherwise, and no network is needed once it is cached. Inside the lab the cache is read-only and
images are only found.

`build_lab_image()` makes the lab's L1 image the same way with /init = memvisor/lab/init.sh (owned by the lab).
The kernel command line the VMM uses for the guest image:
    console=ttyS0 8250.nr_uarts=2 quiet pci=off memhp_default_state=online_movable panic=-1
with the agent (agent.sh) on the virtio-console /dev/hvc0, or on the second UART /dev/ttyS1 without one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from memvisor.boot.vmlinux import write_direct_boot_kernel
from memvisor.errors import MemvisorError
from memvisor.guest import cpio, elf
from memvisor.guest.cpio import InitramfsEntry
from memvisor.guest.modules import ModuleSet, copy_modules, ensure_modules_dep, run_depmod
from memvisor.guest.packages import (
    Pin,
    Progress,
    cache_dir,
    cache_writable,
    fetch_package,
    fetch_pin,
    load_pins,
)

__all__ = [
    "GUEST_CMDLINE",
    "GuestImage",
    "InitramfsEntry",
    "build_initramfs",
    "build_lab_image",
    "ensure_guest_image",
    "fetch_package",
    "find_guest_image",
]

HERE = Path(__file__).parent
INIT_TEMPLATE = HERE / "init.sh"
AGENT_SCRIPT = HERE / "agent.sh"
LAB_INIT = HERE.parent / "lab" / "init.sh"
# The builder's own source: a change to any of these makes a new image.
BUILDER_SOURCES = ("cpio.py", "elf.py", "modules.py", "packages.py", "image.py")

GUEST_CMDLINE = "console=ttyS0 8250.nr_uarts=2 quiet pci=off memhp_default_state=online_movable panic=-1"

# Loaded by the guest's /init in this order (modprobe pulls in what each needs).
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_balloon",
    "virtio_mem",
    "virtio_console",
    "libnvdimm",
    "nd_virtio",
    "virtio_pmem",
    "nd_btt",
    "nd_pmem",
    "crc32c_generic",
    "ext4",
)
# Taken when the flavour has them as modules; skipped when built in or absent.
GUEST_OPTIONAL_MODULES = ("dax", "crc32c_intel", "pvpanic", "pvpanic_mmio")
LAB_MODULES = (
    "kvm",
    "kvm_amd",
    "ccp",
    "irqbypass",
    "virtio_pci",
    "virtio_console",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "veth",  # the guest tests' veth pair between two network namespaces (tests/guest/netns.py)
)
E2FS_PROGRAMS = ("mke2fs", "e2fsck", "debugfs", "tune2fs", "dumpe2fs", "resize2fs")
E2FS_LINKS = {
    "mkfs.ext2": "mke2fs",
    "mkfs.ext3": "mke2fs",
    "mkfs.ext4": "mke2fs",
    "fsck.ext2": "e2fsck",
    "fsck.ext3": "e2fsck",
    "fsck.ext4": "e2fsck",
}
LIB_DIR = "lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
_BASE_DIRS = (
    "bin", "sbin", "usr/bin", "usr/sbin", "usr/lib/memvisor", LIB_DIR, "lib64", "etc", "proc", "sys",
    "dev", "tmp", "run", "root", "mnt", "var",
)  # fmt: skip
_IMAGE_META = "image.json"
VMLINUX = "vmlinux"


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel and initramfs in the cache."""

    kernel: Path  # the bzImage, as Debian ships it
    initrd: Path
    kernel_release: str
    flavour: str
    # The same kernel uncompressed and compacted (memvisor/boot/vmlinux.py), which `memvisor run` boots by
    # default: no decompression in the guest. None in a cache made before it existed and not writable here.
    vmlinux: Path | None = None

    @property
    def boot_kernel(self) -> Path:
        """What memvisor boots when no --kernel is given: the vmlinux where there is one, else the bzImage."""
        return self.vmlinux or self.kernel


# --- generic building blocks --------------------------------------------------------------------------------


def build_initramfs(
    out: Path, files: Sequence[InitramfsEntry] | Path, *, compress: bool = False, console: bool = True
) -> None:
    """Write an initramfs to `out` from entries or from a staging folder (whose tree becomes the root).

    With `console`, a `dev/console` node (5:1) is added so /init has a console before devtmpfs is mounted.
    """
    entries = cpio.entries_from_tree(files) if isinstance(files, Path) else list(files)
    if console:
        if not any(entry.path.strip("/") == "dev" for entry in entries):
            entries.append(cpio.directory("dev"))
        entries.append(cpio.char_device("dev/console", 5, 1))
    cpio.write_archive(out, entries, compress=compress)


def kernel_release(kernel_root: Path) -> str:
    """The release ("6.1.0-56-amd64") of an unpacked linux-image package: its lib/modules folder name."""
    releases = sorted(p.name for p in (kernel_root / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise MemvisorError(
            f"{kernel_root} holds {len(releases)} kernel releases, expected 1: remove it and retry"
        )
    return releases[0]


def stage_base(staging: Path) -> None:
    """The skeleton folders and /etc files every image needs."""
    for folder in _BASE_DIRS:
        (staging / folder).mkdir(parents=True, exist_ok=True)
    (staging / "tmp").chmod(0o1777)
    (staging / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (staging / "etc" / "group").write_text("root:x:0:\n")
    (staging / "etc" / "hostname").write_text("memvisor\n")
    (staging / "etc" / "mtab").symlink_to("/proc/mounts")


def stage_busybox(staging: Path, busybox_root: Path) -> Path:
    """busybox at /bin/busybox and a link for each applet at its usual place; returns the host copy's path."""
    busybox = busybox_root / "bin" / "busybox"
    shutil.copyfile(busybox, staging / "bin" / "busybox")
    (staging / "bin" / "busybox").chmod(0o755)
    result = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MemvisorError(f"{busybox} --list-full failed: remove {busybox_root} from the cache and retry")
    for applet in result.stdout.split():
        link = staging / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    return busybox


def _find_library(soname: str, roots: Sequence[Path]) -> Path:
    for root in roots:
        for folder in (LIB_DIR, "usr/" + LIB_DIR):
            candidate = root / folder / soname
            if candidate.exists():
                return candidate.resolve()
    raise MemvisorError(
        f"no pinned package provides {soname}: add its package to pins.json with `memvisor image pin`"
    )


def stage_programs(
    staging: Path, programs: Iterable[tuple[Path, str]], library_roots: Sequence[Path]
) -> None:
    """Copy dynamically linked programs (source, path in the image) with every library they need, and the
    dynamic loader at /lib64, all from the unpacked packages in `library_roots`."""
    pending: list[Path] = []
    for source, dest in programs:
        target = staging / dest
        if target.is_symlink() or target.exists():
            target.unlink()  # a busybox applet link of the same name gives way to the real program
        shutil.copyfile(source, target)
        target.chmod(0o755)
        pending.append(source)
    staged: set[str] = set()
    while pending:
        for soname in elf.needed_libraries(pending.pop()):
            if soname in staged:
                continue
            staged.add(soname)
            library = _find_library(soname, library_roots)
            shutil.copyfile(library, staging / LIB_DIR / soname)
            (staging / LIB_DIR / soname).chmod(0o755)
            pending.append(library)
    loader = _find_library(LOADER, library_roots)
    shutil.copyfile(loader, staging / LIB_DIR / LOADER)
    (staging / LIB_DIR / LOADER).chmod(0o755)
    (staging / "lib64" / LOADER).symlink_to(f"/{LIB_DIR}/{LOADER}")


def stage_modules(
    staging: Path,
    kernel_root: Path,
    busybox: Path,
    names: Sequence[str],
    optional: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Copy `names` (+ `optional` ones that exist) and their dependencies into `staging`, run depmod there.

    Returns the loadable module names among `names` and among `optional`, in the given order, for /init
    (built-in ones need no modprobe).
    """
    release = kernel_release(kernel_root)
    modules = ModuleSet(ensure_modules_dep(busybox, kernel_root, release))
    copy_modules(modules, modules.closure(names, optional=optional), staging, release)
    run_depmod(busybox, staging, release)
    return modules.loadable_names(names), modules.loadable_names(optional)


# --- the cache of images ------------------------------------------------------------------------------------


def _hash_text(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_key(
    kind: str, flavour: str, pins: Sequence[Pin], modules: Sequence[str], texts: Sequence[Path]
) -> str:
    """A hash of everything an image is made of: pins, module list, scripts and the builder's source."""
    sources = [HERE / name for name in BUILDER_SOURCES]
    document = {
        "kind": kind,
        "flavour": flavour,
        "pins": [pin.as_json() for pin in pins],
        "modules": list(modules),
        "texts": {path.name: _hash_text(path) for path in texts},
        "builder": {path.name: _hash_text(path) for path in sources if path.exists()},
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:20]


def _image_dir(kind: str, flavour: str, key: str, cache: Path) -> Path:
    return cache / "images" / f"{kind}-{flavour}-{key}"


def _load_image(folder: Path) -> GuestImage | None:
    try:
        meta = json.loads((folder / _IMAGE_META).read_text())
        vmlinux = folder / VMLINUX if (folder / VMLINUX).is_file() else None
        image = GuestImage(
            folder / "vmlinuz", folder / "initrd.img", meta["kernel_release"], meta["flavour"], vmlinux
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image if image.kernel.is_file() and image.initrd.is_file() else None


def _with_vmlinux(image: GuestImage, progress: Progress) -> GuestImage:
    """`image` with its compact vmlinux, made now beside the bzImage if missing (images built before it existed).

    Written atomically, so processes already using the image are not disturbed. Without a payload memvisor can
    unpack, the image stays bzImage-only."""
    if image.vmlinux is not None:
        return image
    target = image.kernel.parent / VMLINUX
    if progress:
        progress(f"unpacking the kernel for direct boot: {target}")
    if not write_direct_boot_kernel(image.kernel, target):
        return image
    return dataclasses.replace(image, vmlinux=target)


@contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """One builder at a time per cache (a second waits, then finds the first one's result)."""
    (cache / "images").mkdir(parents=True, exist_ok=True)
    with (cache / "images" / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _guest_recipe(flavour: str) -> tuple[list[Pin], list[Path]]:
    pins = load_pins()
    used = [pins.kernel(flavour)] + [pins.package(name) for name in sorted(pins.packages)]
    return used, [INIT_TEMPLATE, AGENT_SCRIPT]


def find_guest_image(flavour: str = "default", *, cache: Path | None = None) -> GuestImage | None:
    """The cached guest image of `flavour` for the current pins and scripts, or None (never builds)."""
    used, texts = _guest_recipe(flavour)
    key = image_key("guest", flavour, used, [*GUEST_MODULES, *GUEST_OPTIONAL_MODULES], texts)
    return _load_image(_image_dir("guest", flavour, key, cache or cache_dir()))


def _build_image(
    kind: str,
    flavour: str,
    used: list[Pin],
    texts: list[Path],
    modules: Sequence[str],
    stage: _Stager,
    progress: Progress,
) -> GuestImage:
    cache = cache_dir()
    key = image_key(kind, flavour, used, modules, texts)
    final = _image_dir(kind, flavour, key, cache)
    found = _load_image(final)
    if found is not None:
        return _with_vmlinux(found, progress) if kind == "guest" and cache_writable(cache) else found
    if not cache_writable(cache):
        raise MemvisorError(
            f"the {kind} image ({flavour}) is not in the cache {cache}, which is read-only here (inside the lab): "
            f"run `memvisor image build --flavour {flavour}` on the host first"
        )
    with _build_lock(cache):
        found = _load_image(final)
        if found is not None:
            return _with_vmlinux(found, progress) if kind == "guest" else found
        roots = {pin.package: fetch_pin(pin, progress=progress, cache=cache) for pin in used}
        if progress:
            progress(f"building the {kind} initramfs ({flavour} kernel, {used[0].package} {used[0].version})")
        with tempfile.TemporaryDirectory(dir=cache / "images", prefix=".build-") as tmp_name:
            tmp = Path(tmp_name)
            staging, out = tmp / "staging", tmp / "out"
            staging.mkdir()
            out.mkdir()
            kernel_root = roots[used[0].package]
            release = kernel_release(kernel_root)
            stage(staging, roots, kernel_root)
            build_initramfs(out / "initrd.img", staging)
            shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
            if kind == "guest":
                write_direct_boot_kernel(out / "vmlinuz", out / VMLINUX)
            meta = {
                "kind": kind,
                "flavour": flavour,
                "kernel_release": release,
                "pins": [p.as_json() for p in used],
            }
            (out / _IMAGE_META).write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)  # an incomplete leftover
            os.rename(out, final)
    image = _load_image(final)
    if image is None:
        raise MemvisorError(f"the image just built in {final} is unreadable: remove it and retry")
    if progress:
        progress(f"{kind} image ready: {final}")
    return image


class _Stager:
    """Fills a staging tree from the unpacked packages (one per image kind)."""

    def __call__(self, staging: Path, roots: dict[str, Path], kernel_root: Path) -> None:
        raise NotImplementedError


class _GuestStager(_Stager):
    def __call__(self, staging: Path, roots: dict[str, Path], kernel_root: Path) -> None:
        stage_base(staging)
        busybox = stage_busybox(staging, roots["busybox-static"])
        e2fs = roots["e2fsprogs"]
        stage_programs(
            staging,
            [(e2fs / "sbin" / name, f"sbin/{name}") for name in E2FS_PROGRAMS],
            [
                roots[name]
                for name in ("libc6", "libext2fs2", "libcom-err2", "libss2", "libblkid1", "libuuid1")
            ],
        )
        for link, target in E2FS_LINKS.items():
            path = staging / "sbin" / link
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(target)
        shutil.copyfile(e2fs / "etc" / "mke2fs.conf", staging / "etc" / "mke2fs.conf")
        required, optional = stage_modules(
            staging, kernel_root, busybox, GUEST_MODULES, GUEST_OPTIONAL_MODULES
        )
        init = INIT_TEMPLATE.read_text().replace("@MODULES@", " ".join(required))
        init = init.replace("@OPTIONAL_MODULES@", " ".join(optional))
        (staging / "init").write_text(init)
        (staging / "init").chmod(0o755)
        shutil.copyfile(AGENT_SCRIPT, staging / "usr" / "lib" / "memvisor" / "agent.sh")
        (staging / "usr" / "lib" / "memvisor" / "agent.sh").chmod(0o755)


class _LabStager(_Stager):
    def __init__(self, init_text: str, modules: Sequence[str]) -> None:
        self.init_text = init_text
        self.modules = modules

    def __call__(self, staging: Path, roots: dict[str, Path], kernel_root: Path) -> None:
        stage_base(staging)
        busybox = stage_busybox(staging, roots["busybox-static"])
        loaded, _ = stage_modules(staging, kernel_root, busybox, self.modules)
        (staging / "etc" / "memvisor").mkdir()
        (staging / "etc" / "memvisor" / "modules").write_text("\n".join(loaded) + "\n")
        (staging / "init").write_text(self.init_text)
        (staging / "init").chmod(0o755)


def ensure_guest_image(flavour: str = "default", *, progress: Progress = None) -> GuestImage:
    """The guest image of `flavour` ("default" = linux-image-*-amd64, "cloud" = -cloud-amd64).

    Found in the cache when it exists for the current pins and scripts; built otherwise (downloads once,
    then works offline). Inside the lab (read-only cache) it is only found: a missing image is a
    MemvisorError telling to run `memvisor image build` on the host.
    """
    used, texts = _guest_recipe(flavour)
    return _build_image(
        "guest", flavour, used, texts, [*GUEST_MODULES, *GUEST_OPTIONAL_MODULES], _GuestStager(), progress
    )


def build_lab_image(progress: Progress = None, *, extra_modules: Sequence[str] = ()) -> GuestImage:
    """The lab's L1 image: the default kernel and an initramfs with busybox, the KVM (AMD, nested), 9p over
    virtio-pci, virtio-console and veth modules, and /init = memvisor/lab/init.sh (read now, part of the key).

    Cached like the guest image; `extra_modules` adds modules (with their dependencies).
    """
    if not LAB_INIT.is_file():
        raise MemvisorError(f"the lab init script {LAB_INIT} is missing: restore it from git")
    pins = load_pins()
    used = [pins.kernel("default"), pins.package("busybox-static")]
    modules = [*LAB_MODULES, *extra_modules]
    stager = _LabStager(LAB_INIT.read_text(), modules)
    return _build_image("lab", "default", used, [LAB_INIT], modules, stager, progress)
